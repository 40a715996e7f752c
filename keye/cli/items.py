"""``keye items export | tokenize | movielens``.

    keye items export catalogue.jsonl runs/emb                      # text-only (MiniLM) embeddings, resumable
    keye items export catalogue.jsonl runs/emb --encoder keye --checkpoint ckpt --fps 2
    keye items tokenize runs/emb runs/sid codes=256 collision=suffix  # semantic IDs + all output files
    keye items movielens                                            # ML-100K: text -> IDs -> metrics
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from keye.cli.options import add_overrides, add_video_flags, video_options_from
from keye.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_RECIPE = REPO_ROOT / "tokenizers" / "semantic_ids" / "default.yaml"
MOVIELENS_RECIPE = REPO_ROOT / "tokenizers" / "semantic_ids" / "movielens.yaml"


def _key_values(pairs: list[str], flag: str, cast) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"{flag} {pair!r}: expected KEY=VALUE")
        out[key.strip()] = cast(value)
    return out


def _build_encoder(args: argparse.Namespace):
    from keye.items.catalogue import TEXT_FIELDS
    from keye.items.encoders import SentenceTextEncoder, text_item_encoder

    fields = [f.strip() for f in args.text_fields.split(",") if f.strip()] if args.text_fields else list(TEXT_FIELDS)
    if args.encoder == "minilm":
        text = SentenceTextEncoder(args.text_model, fields=fields, pooling=args.pooling)
        return text_item_encoder(text, normalize=not args.no_normalize)
    if not args.checkpoint or not Path(args.checkpoint, "config.json").is_file():
        raise ConfigError(f"--encoder keye needs --checkpoint DIR with config.json, got {args.checkpoint!r}")
    from keye.api import load
    from keye.items.encoders import KeyeItemEncoder

    # as keye.load reads any checkpoint (toolkit or published, its own processor files, safetensors only);
    # fp32 on the CPU, so the same catalogue always gives the same embeddings
    pipe = load(args.checkpoint, device="cpu", dtype="float32")
    return KeyeItemEncoder(
        pipe.model, pipe.processor, checkpoint=str(args.checkpoint), fusion=args.fusion, normalize=not args.no_normalize,
        weights=_key_values(args.weight, "--weight", float), text_fields=fields,
        media_options=video_options_from(args).message(), vision_pooling=args.vision_pooling,
    )


def _export(args: argparse.Namespace) -> int:
    from keye.items.export import export_embeddings, problems_path

    report = export_embeddings(
        args.catalogue, _build_encoder(args), args.out, batch_size=args.batch_size, shard_size=args.shard_size,
        shard_seconds=args.shard_seconds, progress=not args.quiet,
    )
    print(f"{args.out}: {report.summary()}")
    for problem in report.problems[:20]:
        print(f"  {problem['kind']}: pid={problem.get('pid')!r} {problem.get('where', '')} {problem['reason']}")
    if len(report.problems) > 20:
        print(f"  ... {len(report.problems) - 20} more in {problems_path(args.out)}")
    return 0


def _print_result(result, out: Path) -> None:
    from keye.items.metrics import format_metrics

    print(f"semantic IDs written to {out} (codebook sizes {result.ids.codebook_sizes})")
    print("-- quantizer codes (before the collision policy) --")
    print(format_metrics(result.metrics["codes"]))
    print(f"-- final IDs (collision policy '{result.ids.policy}') --")
    print(format_metrics(result.metrics["ids"]))
    print(f"report: {out / 'metrics.json'}")


def _tokenize(args: argparse.Namespace) -> int:
    from keye.config import load_config
    from keye.items.semantic_ids import SemanticIdConfig
    from keye.items.tokenize import run_tokenize

    config = load_config(SemanticIdConfig, args.config, args.overrides)
    _print_result(run_tokenize(args.embeddings, args.out, config), Path(args.out))
    return 0


def _movielens(args: argparse.Namespace) -> int:
    from keye.items.encoders import text_item_encoder
    from keye.items.export import export_embeddings
    from keye.config import load_config
    from keye.items.movielens import movielens_items, recbole_wheel, write_catalogue
    from keye.items.semantic_ids import SemanticIdConfig
    from keye.items.tokenize import run_tokenize

    out = Path(args.out)
    config = load_config(SemanticIdConfig, args.config, args.overrides)
    records = movielens_items(recbole_wheel(args.cache or out / "cache"))
    catalogue = write_catalogue(records, out / "catalogue.jsonl")
    report = export_embeddings(catalogue, text_item_encoder(), out / "embeddings", progress=not args.quiet)
    print(f"MovieLens-100K: {len(records)} items; {report.summary()}")
    result = run_tokenize(out / "embeddings", out / "semantic_ids", config)
    _print_result(result, out / "semantic_ids")
    if args.json:
        print(json.dumps(result.metrics))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    items = subparsers.add_parser("items", help="item embeddings, semantic IDs, itemic tokens")
    sub = items.add_subparsers(dest="items_command", metavar="ITEMS_COMMAND", required=True)

    export = sub.add_parser("export", help="embed every catalogue item into parquet shards (pid, embedding)")
    export.add_argument("catalogue", help="jsonl or parquet with pid and video / image / title / caption / asr / ocr")
    export.add_argument("out", help="folder for the shards (rerun to resume)")
    export.add_argument("--encoder", choices=["minilm", "keye"], default="minilm")
    export.add_argument("--checkpoint", help="keye: checkpoint folder (config.json, model.safetensors, tokenizer)")
    export.add_argument("--fusion", default="mean", choices=["mean", "weighted", "concat"], help="keye: fusion rule")
    export.add_argument("--weight", action="append", default=[], metavar="MODALITY=W", help="keye: weighted fusion")
    export.add_argument("--vision-pooling", default="decoder", choices=["decoder", "vit"],
                        help="keye: video / image embedding = mean decoder state over the visual tokens (default: "
                             "one space with text) or the ViT's pooled output alone (content only, no LM pass)")
    export.add_argument("--text-model", default=None, help="minilm: sentence-encoder folder (default: bundled)")
    export.add_argument("--text-fields", default=None,
                        help="comma list, in join order (default: every text field, keye.items.catalogue.TEXT_FIELDS)")
    export.add_argument("--pooling", default="mean", choices=["mean", "cls"])
    export.add_argument("--no-normalize", action="store_true", help="skip the final L2 normalisation")
    export.add_argument("--batch-size", type=int, default=32)
    export.add_argument("--shard-size", type=int, default=4096, help="a shard is written every N rows ...")
    export.add_argument("--shard-seconds", type=float, default=60.0,
                        help="... or every S seconds, whichever comes first: a killed export loses at most that")
    export.add_argument("--quiet", action="store_true", help="no progress bar")
    add_video_flags(export)  # keye encoder: how its videos and images are sampled
    export.set_defaults(func=_export)

    tok = sub.add_parser("tokenize", help="residual k-means semantic IDs from an embeddings parquet / shard folder")
    tok.add_argument("embeddings")
    tok.add_argument("out")
    add_overrides(tok, example="kmeans.iters=10")
    tok.add_argument("--config", default=str(DEFAULT_RECIPE), help="recipe yaml (default: %(default)s)")
    tok.set_defaults(func=_tokenize)

    ml = sub.add_parser("movielens", help="MovieLens-100K: MiniLM text embeddings -> semantic IDs -> metrics")
    ml.add_argument("--out", default="runs/items/movielens")
    ml.add_argument("--cache", default=None, help="where the recbole wheel is downloaded (default: OUT/cache)")
    add_overrides(ml, example="kmeans.iters=10")
    ml.add_argument("--config", default=str(MOVIELENS_RECIPE), help="recipe yaml (default: %(default)s)")
    ml.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    ml.add_argument("--quiet", action="store_true")
    ml.set_defaults(func=_movielens)
