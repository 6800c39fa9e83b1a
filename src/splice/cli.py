"""The ``splice`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from splice.core.errors import InputError, Problem, SpliceError, clip, short


class UsageError(InputError):
    """A command line argparse refuses (unknown flag, a value of the wrong type): exit status 2."""

    def __init__(self, message: str, usage: str):
        super().__init__(message)
        self.usage = usage


class _Parser(argparse.ArgumentParser):
    """argparse, reporting a bad command line as splice reports every error: what was wrong, and the fix."""

    def error(self, message: str):
        raise UsageError(f"{message}\n    fix: see `{self.prog} --help`", self.format_usage())


def _as_flags(problems: list[Problem]) -> list[Problem]:
    """Problems named by a setting (``max_steps``) renamed to the flag that sets it (``--max-steps``)."""
    return [dataclasses.replace(p, path="--" + p.path.replace("_", "-")) for p in problems]


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
    for title, group in (("names two plugins registered (switched off; everything else works)",
                          [f for f in failures if f.clash]),
                         ("plugins that failed to load (the others work)", [f for f in failures if not f.clash])):
        if group:
            print(f"\n{title}:")
            for f in group:
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
            if e.impl is not None:  # a composition kind: its spec's keys, and the transformers layouts it reads
                for fmt in e.impl.formats:
                    print(f"  reads transformers {fmt.name}: model_type {', '.join(fmt.model_types) or '-'}"
                          + ("; exports it" if fmt.export else ""))
            print("  spec keys:" if kind == "kind" else "  config:")
            for fname, field in e.config_cls.model_fields.items():
                print(f"    {fname}: {_type_name(field.annotation)}{_default_text(field)}"
                      + (f"  — {field.description}" if field.description else ""))
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
        raise UnknownComponentError.for_name("component", args.name, known, list_kind="")
    return 0


def _type_name(annotation) -> str:
    """``int``, ``int | None``, ``Literal['gelu', 'relu']``: a field's type as a user writes it."""
    import re

    name = getattr(annotation, "__name__", None)
    if name and not getattr(annotation, "__args__", None):
        return name
    text = str(annotation).replace("typing.", "").replace("NoneType", "None")
    text = re.sub(r"Annotated\[(\w+), [^\]]*\]", r"\1", text)  # drop pydantic's constraint metadata
    return re.sub(r"^Optional\[(.*)\]$", r"\1 | None", text)


def _default_text(field) -> str:
    if field.is_required():
        return "  (required)"
    if field.default_factory is not None:
        return f" = {field.default_factory()!r}"
    return f" = {field.default!r}"


def _describe_layers(entry) -> None:
    """Which cross-attention the decoder's tiny variant gets in each layer, per adapter placement."""
    from splice.core.meta import params_on_meta

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

    return run_cli(args.model, args.images, num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, as_json=args.json,
                   prompt=args.prompt)


def _cmd_classify(args) -> int:
    from splice.zero_shot import run_classify

    return run_classify(args.model, args.images, labels=args.labels, template=args.template, as_json=args.json)


def _cmd_ask(args) -> int:
    from splice.ask import run_ask

    for flag, value in (("--max-new-tokens", args.max_new_tokens), ("--num-beams", args.num_beams)):
        if value < 1:
            raise InputError(f"{flag}: given {value}; expected an integer >= 1\n    fix: e.g. {flag} 4")
    return run_ask(args.model, args.image, args.question, box=args.box, arrow=args.arrow,
                   max_new_tokens=args.max_new_tokens, num_beams=args.num_beams)


def _cmd_embed(args) -> int:
    from splice.zero_shot import run_embed

    return run_embed(args.model, images=args.images, texts=args.texts, out=args.out)


def _cmd_vqa(args) -> int:
    from splice.vqa import run_cli

    return run_cli(args.model, [args.image], args.question, top_k=args.top_k, as_json=args.json)


def _cmd_schema(args) -> int:
    import splice

    print(json.dumps(splice.schema(args.kind), indent=2))
    return 0


def _cmd_demo(args) -> int:
    from splice.demo import check_settings

    if args.kind == "dual-encoder":
        from splice import demo_dual_encoder as chosen
    elif args.kind == "single-stream":
        from splice import demo_vqa as chosen
    elif args.kind == "prefix-lm":
        from splice import demo_prefix_lm as chosen
    else:
        from splice import demo as chosen
    out = args.out or ("out/demo" if args.kind == "encoder-decoder" else f"out/demo-{args.kind}")
    problems = check_settings(minutes=args.minutes, threads=args.threads, seed=args.seed, out=out,
                              recipe=chosen.RECIPE)
    if problems:
        raise InputError(_as_flags(problems), source="splice demo")
    return chosen.run(spec=args.spec, out=out, minutes=args.minutes, threads=args.threads, seed=args.seed)


def _cmd_train(args) -> int:
    """Every flag is checked before the model or the data is loaded."""
    from splice.data import find_sources
    from splice.train import TrainConfig, train, world_size

    fields = {f for f in TrainConfig.__dataclass_fields__}
    settings = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    settings["progress"] = not args.no_progress
    config = TrainConfig(**settings)
    problems = config.problems(world_size())
    if problems:
        raise InputError(_as_flags(problems), source="splice train")
    tokenizer = _read_tokenizer(args.tokenizer) if args.tokenizer else None
    for flag, source in (("--data", args.data), ("--eval-data", args.eval_data)):
        if source is not None and source != "shapes":
            try:
                find_sources(source)
            except InputError as exc:
                raise InputError(f"{flag}: {exc}") from None
    model = args.model
    if tokenizer is not None or args.freeze:
        from splice.data import check_tokenizer
        from splice.train import load_model

        model = load_model(model, seed=config.seed)
        if tokenizer is not None:
            check_tokenizer(tokenizer, model, f"--tokenizer {short(args.tokenizer)}")
            model.tokenizer = tokenizer
        if args.freeze:
            from splice.core.composer import apply_freeze

            apply_freeze(model, args.freeze)
    try:
        result = train(model, args.data, config, eval_data=args.eval_data)
    except KeyboardInterrupt:
        print(f"\naborted; the last checkpoint, if any, is in {args.out}/checkpoint", file=sys.stderr)
        return 130
    return 130 if result.stopped == "interrupted" else 0


def _read_tokenizer(path: str):
    """``--tokenizer``: a tokenizer.json (a regular file), or an ``InputError`` saying what it is instead."""
    from tokenizers import Tokenizer

    fix = "    fix: give the tokenizer.json the decoder was trained with (a saved model folder has one)"
    try:
        if not Path(path).is_file():
            what = "not a regular file" if Path(path).exists() else "no such file"
            raise InputError(f"--tokenizer: {short(path)}: {what}\n{fix}")
        text = Path(path).read_bytes().decode("utf-8")
        return Tokenizer.from_str(text)
    except InputError:
        raise
    except Exception as exc:  # OSError, UnicodeDecodeError, or the tokenizers library's own parse error
        raise InputError(f"--tokenizer: {short(path)}: not a tokenizer.json ({type(exc).__name__}: "
                         f"{clip(str(exc), 200)})\n{fix}") from None


def _parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The command line; `splice train`'s setting flags (from splice.train, which imports torch) are added only
    when ``argv`` names the train command, so that `splice --help` and `splice list` start without torch."""
    parser = _Parser(prog="splice", description="Compose vision encoders with text decoders.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="registered components and presets")
    p.add_argument("--kind", choices=["encoder", "decoder", "text_encoder", "adapter", "projection", "kind", "preset"],
                   help="one kind of component; `kind` lists the composition kinds (encoder-decoder, ...)")
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
    p.add_argument("--num-beams", type=int, default=None, help=">= 1; default: the model's generation settings (else 1)")
    p.add_argument("--max-new-tokens", type=int, default=None, help=">= 1; default: the model's generation settings")
    p.add_argument("--prompt", default=None, help="text the decoder starts from, after decoder_start (a task prompt "
                   "such as Donut's <s_cord-v2>, or the start of a caption); needs the model's tokenizer")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_caption)

    _add_model_commands(sub)

    p = sub.add_parser("schema", help="JSON Schema of the composition spec")
    p.add_argument("--kind", default=None, help="a composition kind (`splice list --kind kind`); default encoder-decoder")
    p.set_defaults(fn=_cmd_schema)

    p = sub.add_parser("demo", help="the embedded default: train a tiny captioner on synthetic shapes, then caption")
    p.add_argument("--kind", choices=["encoder-decoder", "dual-encoder", "prefix-lm", "single-stream"],
                   default="encoder-decoder", help="encoder-decoder: a captioner (default); dual-encoder: contrastive, "
                   "then zero-shot labels; prefix-lm: questions with visual prompts (CLIP + LLaMA); single-stream: "
                   "questions about the shapes (VisualBERT + ViT)")
    p.add_argument("--spec", default=None, help="spec to train (default: examples/demo-captioner.yaml, or "
                   "examples/demo-dual-encoder.yaml with --kind dual-encoder)")
    p.add_argument("--out", default=None, help="output folder (default: out/demo, out/demo-dual-encoder)")
    p.add_argument("--minutes", type=float, default=5.0, help="training time budget, > 0 (default 5)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads, 1 to 1024 (default 2)")
    p.add_argument("--seed", type=int, default=0, help="0 to 2**32-1 (default 0)")
    p.set_defaults(fn=_cmd_demo)

    _add_train(sub, argv is None or "train" in argv)
    return parser


def _add_model_commands(sub) -> None:
    """The commands that run a saved model of the other kinds: classify, ask, embed, vqa."""
    p = sub.add_parser("classify", help="zero-shot scores of images for labels, with a dual-encoder model")
    p.add_argument("model")
    p.add_argument("images", nargs="+")
    p.add_argument("--labels", required=True, help='comma-separated class names, e.g. "cat,dog,car"')
    p.add_argument("--template", default="a photo of a {}.", help="the prompt, {} standing for the label")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_classify)

    p = sub.add_parser("ask", help="answer a question about an image with a prefix-LM model (LLaVA, VipLlava)")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--box", default=None,
                   help="x0,y0,x1,y1: draw a red rectangle there first (VipLlava's visual prompt)")
    p.add_argument("--arrow", default=None, help="x0,y0,x1,y1: draw a red arrow from (x0,y0) to (x1,y1) first")
    p.add_argument("--max-new-tokens", type=int, default=32, help=">= 1 (default 32)")
    p.add_argument("--num-beams", type=int, default=1, help=">= 1 (default 1: greedy)")
    p.set_defaults(fn=_cmd_ask)

    p = sub.add_parser("embed", help="projected features of images or texts (a dual-encoder model) to safetensors")
    p.add_argument("model")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--images", nargs="+")
    what.add_argument("--texts", nargs="+")
    p.add_argument("--out", required=True, help="the .safetensors file to write")
    p.set_defaults(fn=_cmd_embed)

    p = sub.add_parser("vqa", help="answer a question about an image, with a single-stream model with a vqa head")
    p.add_argument("model")
    p.add_argument("image")
    p.add_argument("question")
    p.add_argument("--top-k", type=int, default=5, help="answers to show, best first")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=_cmd_vqa)


# the parts the built-in kinds' models can freeze (each model checks its own; a third party's kind: its spec)
FREEZE_PARTS = ("encoder", "decoder", "cross_attention", "projection", "vision", "text", "projections", "language",
                "projector", "visual", "head")


def _add_train(sub, with_flags: bool = True) -> None:

    p = sub.add_parser("train", help="train a spec or a saved model on captioned images (Ctrl-C saves a checkpoint)")
    p.add_argument("model", help="a spec (YAML/JSON or preset) or a saved model folder")
    p.add_argument("--data", required=True, help="'shapes' (synthetic), an imagefolder folder, or a .jsonl of {image, text}")
    p.add_argument("--eval-data", default=None, help="evaluation folder/JSONL (default: a held-out 5%%, at most 500)")
    p.add_argument("--out", required=True, help="run folder: metrics.jsonl, checkpoint/, model/")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
    p.add_argument("--overwrite", action="store_true", help="start afresh in an OUT that holds an earlier run")
    if with_flags:
        from splice.train.config import flags

        for option, keywords in flags():  # one per TrainConfig setting, with its help and bound
            p.add_argument(option, **keywords)
    p.add_argument("--tokenizer", default=None, help="tokenizer.json for a model without one (its ids must fit the decoder)")
    p.add_argument("--freeze", nargs="+", default=None, metavar="PART", choices=FREEZE_PARTS,
                   help="freeze these parts too (the spec's freeze list always applies); the kind names them: "
                   "encoder-decoder: encoder decoder cross_attention projection; dual-encoder: vision text "
                   "projections; prefix-lm: vision language projector; single-stream: vision text visual head")
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.set_defaults(fn=_cmd_train)


def main(argv: list[str] | None = None) -> int:
    """Run one command: 0 on success, 1 on a ``SpliceError`` (printed as ``error: ...`` with its fix), 2 on a
    command line that does not parse."""
    try:
        args = _parser(sys.argv[1:] if argv is None else argv).parse_args(argv)
        return args.fn(args)
    except BrokenPipeError:
        # the reader went away (`splice describe X | head`): stop quietly, as `cat` does; point stdout at devnull so
        # that the interpreter's last flush does not raise again
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 141  # 128 + SIGPIPE, what the shell reports for a command a closed pipe stopped
    except UsageError as exc:
        print(exc.usage.rstrip() + f"\nerror: {exc}", file=sys.stderr)
        return 2
    except SpliceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
