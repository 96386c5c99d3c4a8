"""Build DeepSpeed's JIT op (CPU Adam) once, before the tests start.

Tests would otherwise build them on first use, inside a timed training run: cpu_adam takes ~55 s
on one idle core and 8+ min while two pytest workers compete for the 2 cores, long enough to hit
a run's timeout (and torch's build lock makes every other run that needs the op wait). Built
into TORCH_EXTENSIONS_DIR (run_scripts/env.sh); a second call only loads them (~1 s).
(The shared-memory all-reduce op is not used: trainer/dist.py keeps it out of training runs.)
"""

from deepspeed.accelerator import get_accelerator

OPS = ("CPUAdamBuilder",)

if __name__ == "__main__":
    for name in OPS:
        get_accelerator().create_op_builder(name).load(verbose=False)
