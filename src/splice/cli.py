"""The ``splice`` command."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from splice.core.errors import SpliceError


def _cmd_list(args) -> int:
    import splice
    from splice.core.plugins import plugin_failures

    rows = splice.list_components(args.kind)
    failures = plugin_failures()
    if args.json:
        print(json.dumps({"components": rows, "plugin_failures": [f.__dict__ for f in failures]}, indent=2, default=str))
        return 0
    kind = None
    for row in rows:
        if row["kind"] != kind:
            kind = row["kind"]
            print(f"{kind}s:")
        alias = f" (aliases: {', '.join(row['aliases'])})" if row["aliases"] else ""
        print(f"  {row['name']:<34} {row['plugin']:<32} {row['description']}{alias}")
    if failures:
        print("\nplugins that failed to load (the others work):")
        for f in failures:
            print(f"  {f}")
    return 0


def _cmd_describe(args) -> int:
    from splice.core.plugins import get_registry
    from splice.core.registry import KINDS

    registry = get_registry()
    found = False
    for kind in KINDS:
        if registry.has(kind, args.name):
            e = registry.get(kind, args.name)
            found = True
            print(f"{kind} {e.name}  (plugin {e.plugin})")
            if e.description:
                print(f"  {e.description}")
            if e.aliases:
                print(f"  aliases: {', '.join(e.aliases)}")
            if e.hf:
                print(f"  reads transformers model_type: {', '.join(e.hf.model_types) or '-'}")
            print("  config:")
            for fname, field in e.config_cls.model_fields.items():
                default = field.default if field.default is not None else "None"
                ann = getattr(field.annotation, "__name__", str(field.annotation)).replace("typing.", "")
                doc = f"  — {field.description}" if field.description else ""
                print(f"    {fname}: {ann} = {default!r}{doc}")
            if e.tiny:
                print(f"  tiny: {json.dumps(e.tiny)}")
            if kind == "decoder" and e.tiny is not None:
                _describe_layers(e)
    preset = registry.presets.get(args.name)
    if preset:
        found = True
        print(f"preset {preset.name}: {preset.kind} {preset.family} {json.dumps(preset.config)}; weights: {preset.weights or '-'}")
    if args.name in registry.compositions:
        found = True
        import yaml

        from splice.core.composer import validate

        print(f"composition preset {args.name}:")
        print("  " + yaml.safe_dump(registry.compositions[args.name], sort_keys=False).replace("\n", "\n  ").rstrip())
        print(validate(args.name).summary())
    if not found:
        from splice.core.errors import UnknownComponentError

        known = [n for k in KINDS for n in registry.names(k, with_aliases=True)] + list(registry.presets) + list(registry.compositions)
        raise UnknownComponentError.for_name("component", args.name, known)
    return 0


def _describe_layers(entry) -> None:
    """Which cross-attention the decoder's tiny variant gets in each layer, per adapter placement."""
    from splice.core.composer import params_on_meta

    with params_on_meta():
        dec = entry.builder(entry.make_config(entry.tiny))
    if getattr(dec, "native_cross_attention", False):
        print("  cross-attention: native in every layer (adapters do not apply)")
    else:
        print("  cross-attention: a slot in every layer, filled by an adapter kind (standard, gated, ...) "
              "for the layers the spec names (all | every-N | a list)")


def _cmd_validate(args) -> int:
    from splice.core.composer import validate

    plan = validate(args.spec)
    if args.json:
        print(json.dumps({"ok": plan.ok, "problems": [p.__dict__ for p in plan.problems], "params": plan.params}, indent=2, default=str))
    else:
        print(plan.summary())
    return 0 if plan.ok else 1


def _cmd_build(args) -> int:
    import splice

    model = splice.compose(args.spec, seed=args.seed, strict=args.strict)
    if model.loading_report is not None:
        print(model.loading_report)
    model.save_pretrained(args.out)
    print(f"built {model.num_parameters():,} parameters -> {args.out}")
    return 0


def _cmd_caption(args) -> int:
    from splice.caption import run_cli

    return run_cli(args.model, args.images, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, as_json=args.json)


def _cmd_schema(args) -> int:
    import splice

    print(json.dumps(splice.schema(), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from splice.demo import run

    return run(spec=args.spec, out=args.out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="splice", description="Compose vision encoders with text decoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered components and presets")
    p.add_argument("--kind", choices=["encoder", "decoder", "adapter", "projection", "preset"])
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_list)

    p = sub.add_parser("describe", help="one component: its config fields, defaults and tiny variant")
    p.add_argument("name")
    p.set_defaults(fn=_cmd_describe)

    p = sub.add_parser("validate", help="check a spec without allocating weights (exit 1 on problems)")
    p.add_argument("spec", help="a YAML/JSON spec or a composition preset name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_validate)

    p = sub.add_parser("build", help="compose a spec and save the model")
    p.add_argument("spec")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--strict", action="store_true", help="fail on missing or unused pretrained weights")
    p.set_defaults(fn=_cmd_build)

    p = sub.add_parser("caption", help="caption images with a saved model (a folder, hub id or transformers folder)")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_caption)

    p = sub.add_parser("schema", help="JSON Schema of the composition spec")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("demo", help="the embedded default: compose, save, load, run a tiny pair")
    p.add_argument("--spec", default=None, help="spec to run (default: the bundled vit-gpt2-tiny)")
    p.add_argument("--out", default="out/demo")
    p.set_defaults(fn=_cmd_demo)

    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except SpliceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
