"""``tta-serve export-clip``: a local CLIP checkpoint -> the ONNX directory that routing serves."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("export-clip")
    def export_clip(
        source: Annotated[
            Path, typer.Argument(help="a transformers CLIP folder, or an open_clip checkpoint file with --open-clip")
        ],
        out: Annotated[Path, typer.Argument(help="directory to write (manifest.json, image.onnx, ...)")],
        open_clip_model: Annotated[
            str | None, typer.Option("--open-clip", help="open_clip model name, e.g. ViT-B-32 (SOURCE is its weights)")
        ] = None,
        prompts: Annotated[
            Path | None,
            typer.Option(help="YAML/TOML with prompts to embed now: a tta-serve config (its routing tables), "
                         "a route -> prompts mapping, or a list"),
        ] = None,
        text: Annotated[
            bool, typer.Option("--text/--no-text", help="also export the text tower and tokenizer (transformers)")
        ] = True,
        opset: Annotated[int, typer.Option(help="ONNX opset")] = 17,
    ) -> None:
        """Export CLIP's image tower (and text tower) to ONNX with a manifest, offline, checked against PyTorch."""
        import logging

        from service.clip.export import ExportError, export_open_clip, export_transformers, read_prompts

        logging.basicConfig(level=logging.INFO, format="%(message)s")
        try:
            texts = read_prompts(prompts) if prompts is not None else None
            if open_clip_model is not None:
                if not source.is_file():
                    raise ExportError(f"{source} is not a checkpoint file")
                manifest = export_open_clip(open_clip_model, source, out, prompts=texts, opset=opset)
            else:
                if not (source / "config.json").is_file():
                    raise ExportError(f"{source} is not a transformers CLIP folder (no config.json)")
                manifest = export_transformers(source, out, prompts=texts, text=text, opset=opset)
        except (ExportError, OSError, ValueError) as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
        parts = ["image tower"]
        if manifest.text is not None:
            parts.append("text tower + tokenizer")
        if manifest.prompts is not None:
            parts.append(f"{manifest.prompts.count} prompt embeddings")
        typer.echo(f"wrote {out}: {', '.join(parts)} (embedding size {manifest.embed_dim})")
        if manifest.text is None and manifest.prompts is None:
            typer.echo("warning: no text tower and no prompts: serving cannot embed any route", err=True)
