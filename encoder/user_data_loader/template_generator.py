"""Template generator plugin (qa): a template file + a JSON of parameter lists -> every combination.

Template file: the question template, a line `---`, the answer template (Jinja2, undefined
variables are errors). Parameters file: `{"name": [values...], ...}`. The rows are the Cartesian
product in the order of the JSON keys, so 2 subjects x 3 recipients x 2 bodies = 12 samples:

    llm-encode --encode_type qa --data_loader_path encoder/user_data_loader/template_generator.py \
        --data_loader_args template=encoder/user_data_loader/email_template.txt \
                           params=encoder/user_data_loader/email_params.json ...
"""

import itertools
import json
from pathlib import Path

HERE = Path(__file__).parent
SEPARATOR = "\n---\n"


def load_template(path: str) -> tuple[str, str]:
    """Split the template file into (question, answer) templates at the `---` line."""
    text = Path(path).read_text(encoding="utf-8")
    if SEPARATOR not in text:
        raise ValueError(f"{path}: expected the question template, a line '---', then the answer "
                         f"template")
    q, a = text.split(SEPARATOR, 1)
    return q.strip("\n"), a.strip("\n")


def combinations(params: dict) -> list[dict]:
    """`{"x": [1, 2], "y": ["a"]}` -> `[{"x": 1, "y": "a"}, {"x": 2, "y": "a"}]`."""
    keys = list(params)
    return [dict(zip(keys, values)) for values in itertools.product(*(params[k] for k in keys))]


def in_split(index: int, *, holdout_every: int, split: str) -> bool:
    """Deterministic hold-out: combination k is held out iff k % holdout_every == holdout_every-1.

    >>> [k for k in range(8) if in_split(k, holdout_every=4, split="heldout")]
    [3, 7]
    """
    if split not in ("all", "train", "heldout"):
        raise ValueError(f"split={split!r}: choose all, train or heldout")
    if split == "all" or holdout_every <= 0:
        return split != "heldout"
    held = index % holdout_every == holdout_every - 1
    return held if split == "heldout" else not held


def data_loader(template=str(HERE / "email_template.txt"), params=str(HERE / "email_params.json"),
                holdout_every="0", split="all"):
    """Every combination of `params` rendered through `template` as {"q", "a"}.

    `holdout_every=N split=train|heldout` keeps 1 in N combinations apart for evaluation (the
    demo trains on split=train and checks generations on split=heldout).
    """
    import jinja2

    every = int(holdout_every)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    q_src, a_src = load_template(template)
    q_tpl, a_tpl = env.from_string(q_src), env.from_string(a_src)
    for k, values in enumerate(combinations(json.loads(Path(params).read_text(encoding="utf-8")))):
        if in_split(k, holdout_every=every, split=split):
            yield {"q": q_tpl.render(**values), "a": a_tpl.render(**values)}
