"""Does a LoRA file fit these models: a report of matched, unmatched and missing modules and wrong
shapes, a guess at the model family of a file that does not fit, and the one error naming it all.
"""

import numpy as np

from library.errors import MAX_LISTED, UserError, listing
from library.lora.keys import ROLE_SUFFIX, split_modules
from library.lora.modules import is_conv
from library.lora.names import SD1_TE_PREFIX
from library.lora.targets import expected_shapes


def _family_hint(sd):
    """A guess at the model family of a LoRA that does not fit SDXL, for the error message."""
    keys = list(sd)
    if any(k.startswith(SD1_TE_PREFIX + "_") for k in keys):
        return ("it has lora_te_* keys (one text encoder): it is a LoRA for Stable Diffusion "
                "1.x/2.x, not SDXL")
    for k in keys:
        if "attn2_to_k.lora_down" in k and np.ndim(sd[k]) == 2:
            ctx = np.shape(sd[k])[1]
            if ctx in (768, 1024):
                return (f"its cross-attention takes {ctx}-dim text features: it is a LoRA for "
                        f"Stable Diffusion {'1.x' if ctx == 768 else '2.x'}, not SDXL")
    if any(("double_blocks" in k or "single_blocks" in k) for k in keys):
        return "it looks like a FLUX LoRA"
    if any("joint_blocks" in k for k in keys):
        return "it looks like an SD3 LoRA"
    if any(("hada_" in k or "lokr_" in k or "oft_" in k) for k in keys):
        return "it is a LyCORIS LoHa/LoKr/OFT file; only LoRA (LoCon) is supported"
    if any(k.endswith(".dora_scale") for k in keys):
        return "it is a DoRA file; DoRA is not supported"
    return None


def match_report(weights_sd, targets, ranks=None):
    """Compare {kohya key: array} with {lora name: original cell} targets (model_targets, or a
    network's modules); `ranks` fixes the rank of some modules (a network's are fixed).

    Returns a dict: modules {name: {rank, alpha, kind}}, matched (names), unmatched_keys (keys
    that fit no module), missing_modules (targets absent from the file), problems (strings:
    wrong shapes, missing factors, ranks that disagree), hint (model family guess).
    """
    ranks = ranks or {}
    modules = split_modules(weights_sd)
    known = {f"{n}{s}" for n in modules for s in ROLE_SUFFIX.values()}
    unmatched = [k for k in weights_sd if k not in known]
    problems, matched, info = [], [], {}
    for name, entry in modules.items():
        down, up, alpha = entry.get("lora_down"), entry.get("lora_up"), entry.get("alpha")
        rank = None if down is None else int(np.shape(down)[0])
        info[name] = {"rank": rank,
                      "alpha": None if alpha is None else float(np.asarray(alpha, np.float64)),
                      "kind": None}
        if name not in targets:
            unmatched += [k for k in (f"{name}{s}" for s in ROLE_SUFFIX.values())
                          if k in weights_sd]
            continue
        if down is None or up is None:
            problems.append(f"{name} has no {'lora_down' if down is None else 'lora_up'}.weight")
            continue
        if alpha is not None and np.size(alpha) != 1:
            problems.append(f"{name}.alpha has shape {np.shape(alpha)}, expected a scalar")
            continue
        org = targets[name]
        want_down, want_up = expected_shapes(org, ranks.get(name, rank))
        info[name]["kind"] = ("conv" + "x".join(map(str, org.kernel_size))
                              if is_conv(org) else "linear")
        bad = []
        if tuple(np.shape(down)) != want_down:
            bad.append(f"{name}.lora_down.weight {tuple(np.shape(down))} (expected {want_down})")
        if tuple(np.shape(up)) != want_up:
            bad.append(f"{name}.lora_up.weight {tuple(np.shape(up))} (expected {want_up})")
        if bad:
            problems += bad
        else:
            matched.append(name)
    missing = [n for n in targets if n not in modules]
    shape_problems = [p for p in problems if "expected" in p]
    report = {"modules": info, "matched": matched, "unmatched_keys": sorted(unmatched),
              "missing_modules": missing, "problems": problems,
              "hint": _family_hint(weights_sd) if (unmatched or shape_problems) else None}
    return report


def raise_if_bad(report, source):
    parts = []
    if report["unmatched_keys"]:
        keys = report["unmatched_keys"]
        parts.append(f"{len(keys)} keys match no module of the SDXL model: {listing(keys)}")
    bad_shapes = [p for p in report["problems"] if "expected" in p]
    if bad_shapes:
        parts.append(f"{len(bad_shapes)} tensors have the wrong shape: {listing(bad_shapes)}")
    others = [p for p in report["problems"] if "expected" not in p]
    if others:
        parts.append("; ".join(others[:MAX_LISTED]))
    if parts:
        hint = f" ({report['hint']})" if report.get("hint") else ""
        raise UserError(f"{source} does not fit this SDXL model{hint}: " + "; ".join(parts))
