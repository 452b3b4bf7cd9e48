"""Regenerate the vendored spec subsets in this folder from the providers' official documents.

    python tests/provider_fake/specs/build.py SOURCE_DIR          # write the JSON subsets
    python tests/provider_fake/specs/build.py SOURCE_DIR --check  # fail if they are stale

SOURCE_DIR holds the documents exactly as published (see README.md here for where each comes from;
the tests never run this script, they read the subsets it wrote). Each subset keeps, verbatim, the paths and methods
the fake serves plus every component they reference, transitively, and the extra schemas named in
`SUBSETS` (line schemas, error envelopes). Only code samples (`x-codeSamples`, the request half of
`x-oaiMeta.examples`) are dropped: they are most of the bytes and no schema. JSON loads ~50x faster
than YAML of this size, which is why the tests read these files and not the documents.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent

# name -> (source document, upstream location, {path: [methods]} or None for all, extra components)
SUBSETS: dict[str, tuple[str, str, dict[str, list[str]] | None, list[str]]] = {
    "openai": (
        "openai-openapi.yaml", "github.com/openai/openai-openapi openapi.yaml (HEAD of 2026-08-21, info.version 2.3.0)",
        {"/files": ["get", "post"], "/files/{file_id}": ["get", "delete"], "/files/{file_id}/content": ["get"],
         "/batches": ["get", "post"], "/batches/{batch_id}": ["get"], "/batches/{batch_id}/cancel": ["post"]},
        ["#/components/schemas/ErrorResponse"]),
    "openai-batch-lines": (
        "openai-openapi-2025-03-21.yaml",
        "github.com/openai/openai-openapi openapi.yaml, branch 2025-03-21 (the last with the JSONL line schemas)",
        {}, ["#/components/schemas/BatchRequestInput", "#/components/schemas/BatchRequestOutput"]),
    "azure": (
        "azure-openai-2024-10-21-files-batches.yaml",
        "github.com/Azure/azure-rest-api-specs specification/cognitiveservices/data-plane/AzureOpenAI/authoring/"
        "stable/2024-10-21/azureopenai.json (Files + Batches paths, transcribed with schemas unchanged)",
        None, []),
    "mistral": (
        "mistral-openapi.yaml", "github.com/mistralai/platform-docs-public public/openapi.yaml (2026-08-21)",
        {"/v1/files": ["get", "post"], "/v1/files/{file_id}": ["get", "delete"],
         "/v1/files/{file_id}/content": ["get"], "/v1/batch/jobs": ["get", "post"],
         "/v1/batch/jobs/{job_id}": ["get", "delete"], "/v1/batch/jobs/{job_id}/cancel": ["post"]},
        ["#/components/schemas/HTTPValidationError"]),
    "together": (
        "together-openapi.yaml", "github.com/togethercomputer/openapi openapi.yaml (2026-04-28, info.version 2.0.0)",
        {"/files": ["get"], "/files/upload": ["post"], "/files/{id}": ["get", "delete"],
         "/files/{id}/content": ["get"], "/batches": ["get", "post"], "/batches/{id}": ["get"],
         "/batches/{id}/cancel": ["post"]},
        ["#/components/schemas/ErrorData", "#/components/schemas/BatchErrorResponse"]),
}
KEEP_TOP = ("openapi", "swagger", "info", "servers", "security", "securityDefinitions", "schemes", "basePath", "host")


def _strip_samples(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key == "x-codeSamples":
                continue
            if key == "x-oaiMeta" and isinstance(value, dict) and isinstance(value.get("examples"), dict):
                value = {**value, "examples": {k: v for k, v in value["examples"].items() if k != "request"}}
            out[key] = _strip_samples(value)
        return out
    if isinstance(node, list):
        return [_strip_samples(v) for v in node]
    return node


def _refs(node: Any) -> set[str]:
    found: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str) and value.startswith("#/"):
                found.add(value)
            else:
                found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def _pointer(doc: Any, ref: str) -> tuple[list[str], Any]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in ref[2:].split("/")]
    node = doc
    for part in parts:
        node = node[part]
    return parts, node


def subset(doc: dict[str, Any], paths: dict[str, list[str]] | None, extra: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {k: doc[k] for k in KEEP_TOP if k in doc}
    if paths is None:
        return _strip_samples(doc)
    out["paths"] = {}
    for path, methods in paths.items():
        item = doc["paths"][path]
        kept = {k: v for k, v in item.items() if k in methods or k in ("parameters", "servers", "summary")}
        missing = set(methods) - set(kept)
        if missing:
            raise SystemExit(f"{path}: no {sorted(missing)} in the source")
        out["paths"][path] = kept
    if "components" in doc and "securitySchemes" in doc["components"]:
        out.setdefault("components", {})["securitySchemes"] = doc["components"]["securitySchemes"]
    todo = _refs(out["paths"]) | set(extra)
    done: set[str] = set()
    while todo:
        ref = todo.pop()
        if ref in done:
            continue
        done.add(ref)
        parts, node = _pointer(doc, ref)
        target = out
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
        todo |= _refs(node) - done
    for section in ("components", "definitions", "parameters"):  # stable order, whatever the walk's
        if isinstance(out.get(section), dict):
            out[section] = {k: (dict(sorted(v.items())) if section == "components" else v)
                            for k, v in sorted(out[section].items())}
    return _strip_samples(out)


def build(source: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for name, (filename, upstream, paths, extra) in SUBSETS.items():
        raw = (source / filename).read_bytes()
        doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        data = subset(doc, paths, extra)
        data["x-sluice-source"] = {"file": filename, "upstream": upstream,
                                   "sha256": hashlib.sha256(raw).hexdigest(),
                                   "generated_by": "tests/provider_fake/specs/build.py"}
        files[f"{name}.json"] = json.dumps(data, indent=1, ensure_ascii=False) + "\n"
    return files


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("source", type=Path, help="the folder of the providers' published documents")
    ap.add_argument("--check", action="store_true", help="exit 1 if a vendored subset differs")
    args = ap.parse_args(argv)
    stale = []
    for name, text in build(args.source).items():
        path = HERE / name
        if args.check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
            print(f"{path.relative_to(HERE.parents[2])}: {len(text) // 1024} KiB")
    if stale:
        print(f"stale: {stale}; run python {Path(__file__).relative_to(HERE.parents[2])}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
