"""`robeval info MODEL`: layers, parameters, input shape, certifier support, Lipschitz bound."""

from __future__ import annotations

import click

from .common import load_data_arg, load_model_arg, reports_errors, write_json
from .options import data_options


def _fmt_shape(shape) -> str:
    return str(tuple(int(d) for d in shape))


def model_facts(adapter) -> dict:
    """Everything `info` shows, as a dict (also the JSON payload)."""
    from ..certifiers import CERTIFIERS

    net = adapter.to_network()
    stripped, _ = net.strip_output_squashers()
    support = {}
    for name, cls in sorted(CERTIFIERS.items()):
        missing = cls.unsupported_ops(net)
        support[name] = {"supported": not missing, "unsupported": [f"{op} ({node})" for op, node in missing]}
    try:
        lipschitz = stripped.lipschitz_bound()
    except Exception as exc:  # an op without a Lipschitz rule: say so instead of a number
        lipschitz = None
        support.setdefault("lipschitz", {})["reason"] = str(exc)
    return {
        "input_shape": list(net.input_shape), "channels_last": bool(getattr(adapter, "channels_last", False)),
        "num_classes": int(getattr(adapter, "num_classes", 0)), "binary": bool(getattr(adapter, "binary", False)),
        "opset_converted_from": net.meta.get("opset_converted_from"), "opset": net.meta.get("opset"),
        "outputs_probabilities": bool(getattr(adapter, "outputs_probabilities", False)),
        "parameters": net.param_count(), "layers": net.summary(), "certifiers": support,
        "lipschitz_bound_l2": lipschitz, "stripped": net.strip_output_squashers()[1],
    }


@click.command("info")
@click.argument("model", required=False)
@click.option("--check", is_flag=True, help="compare native outputs with the converted network on --data")
@click.option("--atol", type=float, default=1e-4, show_default=True, help="tolerance of --check (max |logit diff|)")
@click.option("--model-class", "class_path", default=None, help="package.module:Class for a PyTorch state_dict")
@click.option("--trust-pickle", is_flag=True, help="allow unpickling a full PyTorch model file (runs its code)")
@click.option("--input-shape", default=None, help="per-sample input shape C,H,W when the model does not say")
@click.option("--json", "json_path", default=None, help="write the facts as JSON to this file ('-' for stdout)")
@data_options
@reports_errors
def info(model, check, atol, class_path, trust_pickle, input_shape, json_path, data, data_path, split, limit,
         layout):
    """Show the layers of MODEL, its parameter count, input shape, which certifiers support every
    op, and its global L2 Lipschitz upper bound."""
    adapter, label = load_model_arg(model, class_path, trust_pickle, input_shape)
    facts = model_facts(adapter)
    click.echo(f"model: {label}")
    click.echo(f"input shape: {_fmt_shape(facts['input_shape'])} per sample (NCHW)"
               + ("; the native model is channels-last" if facts["channels_last"] else ""))
    click.echo(f"classes: {facts['num_classes']}" + ("  (outputs probabilities: softmax is stripped for margins)"
                                                       if facts["outputs_probabilities"] else ""))
    if facts["binary"]:
        click.echo("binary classifier: one output logit z, class 1 when z > 0 (scored as [0, z]: margin +-z, "
                   "Lipschitz radius |z| / L)")
    if facts["opset_converted_from"] is not None:
        click.echo(f"ONNX opset {facts['opset_converted_from']} converted to opset {facts['opset']} on load "
                   "(onnx.version_converter)")
    click.echo(f"parameters: {facts['parameters']:,}")
    click.echo("")
    click.echo(f"  {'#':>3}  {'name':<28} {'op':<15} {'output shape':<18} {'params':>10}")
    for i, row in enumerate(facts["layers"]):
        click.echo(f"  {i:>3}  {row['name'][:28]:<28} {row['op']:<15} {_fmt_shape(row['shape']):<18} "
                   f"{row['params']:>10,}")
    click.echo("")
    for name, s in facts["certifiers"].items():
        state = "supports every op" if s["supported"] else "cannot handle: " + ", ".join(s["unsupported"])
        click.echo(f"  {name:<10} {state}")
    bound = facts["lipschitz_bound_l2"]
    click.echo("")
    click.echo(f"global L2 Lipschitz upper bound (logits): {bound:.6g}" if bound is not None
               else "global L2 Lipschitz upper bound: not available (see above)")
    if check:
        from ..adapters.fidelity import check_fidelity

        x, _, name = load_data_arg(adapter, data, data_path, split, limit or 256, model is None, layout)
        diff = check_fidelity(adapter, x, atol=atol)
        facts["fidelity"] = {"data": name, "n": int(len(x)), "max_abs_diff": diff, "atol": atol}
        click.echo(f"fidelity on {len(x)} samples of {name}: max |native - network| = {diff:.3g} (atol {atol}) OK")
    write_json(facts, json_path)
