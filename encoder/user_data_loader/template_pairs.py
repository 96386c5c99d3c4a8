"""Preference pairs from a template (for --encode_type preference): every combination of the
parameters gives {"prompt", "chosen", "rejected"}: chosen = the answer template rendered with the
combination's values, rejected = the same answer with one value swapped for a wrong one (by
default the recipient or the day, alternating), so a model must copy the prompt's facts to prefer
the chosen answer. Same template format and hold-out rule as template_generator.py:

    llm-encode --encode_type preference --template alpaca \
        --data_loader_path encoder/user_data_loader/template_pairs.py \
        --data_loader_args template=run_scripts/demo_task/template.txt \
                           params=run_scripts/demo_task/params.json holdout_every=8 split=train ...
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from template_generator import combinations, in_split, load_template  # noqa: E402


def data_loader(template, params, corrupt="recipient,day", holdout_every="0", split="all"):
    """`corrupt`: the parameters whose value the rejected answer gets wrong, in turn."""
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    q_src, a_src = load_template(template)
    q_tpl, a_tpl = env.from_string(q_src), env.from_string(a_src)
    values_of = json.loads(Path(params).read_text(encoding="utf-8"))
    keys = [k for k in str(corrupt).split(",") if k]
    for key in keys:
        if len(values_of.get(key, [])) < 2:
            raise ValueError(f"corrupt={key}: {params} needs a list of at least 2 values for it")
    for k, values in enumerate(combinations(values_of)):
        if not in_split(k, holdout_every=int(holdout_every), split=split):
            continue
        key = keys[k % len(keys)]
        options = values_of[key]
        # a wrong value that varies with the combination (not always the next one in the list)
        shift = 1 + (k // len(keys)) % (len(options) - 1)
        wrong = dict(values, **{key: options[(options.index(values[key]) + shift) % len(options)]})
        yield {"prompt": q_tpl.render(**values), "chosen": a_tpl.render(**values),
               "rejected": a_tpl.render(**wrong)}
