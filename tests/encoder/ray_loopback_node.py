"""`ray start ...` for a node of a test cluster that lives on 127.0.0.1 only.

Ray binds its servers to loopback only when the node IP is 127.0.0.1, which it keeps only with
RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 (otherwise 127.0.0.1 is replaced by the machine's outward IP and
the GCS listens on every interface). With that setting `ray start --address` refuses to add a
second node ("multi-node clusters are not supported"); this wrapper lifts that one check for the
CLI only (the rest of Ray still sees the setting), so a head and a worker node run on this
machine with nothing reachable from outside.

    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 python ray_loopback_node.py start --block --address=127.0.0.1:PORT ...
"""

import sys
import types

import ray._private.ray_constants as ray_constants
import ray.scripts.scripts as scripts


class _ClusterAllowed(types.ModuleType):
    ENABLE_RAY_CLUSTER = True

    def __getattr__(self, name):
        return getattr(ray_constants, name)


if __name__ == "__main__":
    scripts.ray_constants = _ClusterAllowed("ray_constants_for_the_start_command")
    sys.argv = ["ray", *sys.argv[1:]]
    sys.exit(scripts.main())
