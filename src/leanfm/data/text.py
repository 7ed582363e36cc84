"""Text datasets by name: ``wikitext2``, ``gensim-wiki``, or any local ``.txt`` file.

``wikitext2`` (WikiText-2 v1, tokenized with ``<unk>``) is read from
``<data_dir>/wikitext-2/<split>.txt`` where ``data_dir`` is ``--data-dir`` or
``$LEANFM_DATA_DIR``; without a local copy the ``datasets`` library is tried (needs the hub).
Lines are joined as in the GPTQ evaluation code: the Hugging Face dataset stores each line with
its newline and blank lines as ``""``, and the test text is ``"\n\n".join(lines)``.

``gensim-wiki`` is the ~480k-word Wikipedia sample packaged inside gensim, cleaned with
``filter_wiki`` once and cached; it is the default calibration source (calibrate on one corpus,
evaluate on another).
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import LeanfmError

DATASETS = ("wikitext2", "gensim-wiki")
_GENSIM_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    d = explicit or os.environ.get("LEANFM_DATA_DIR")
    return Path(d).expanduser() if d else None


def join_lines(raw: str) -> str:
    """GPTQ/HF join: each line keeps its newline, blank lines are empty, joined by a blank line."""
    lines = ["" if not ln.strip() else ln for ln in raw.splitlines(keepends=True)]
    return "\n\n".join(lines)


def _wikitext2(split: str, ddir: Path | None) -> str:
    if split not in ("test", "valid", "validation", "train"):
        raise LeanfmError(f"wikitext2 has splits test, valid (and train via the datasets library), not '{split}'")
    fname = "valid" if split == "validation" else split
    if ddir is not None:
        path = ddir / "wikitext-2" / f"{fname}.txt"
        if path.exists():
            return join_lines(path.read_text(encoding="utf-8"))
    try:
        import datasets  # optional: pip install 'leanfm[hub]'

        hf_split = "validation" if fname == "valid" else fname
        ds = datasets.load_dataset("wikitext", "wikitext-2-v1", split=hf_split)
        return "\n\n".join(ds["text"])
    except Exception:  # noqa: BLE001 - any failure means: no local file and no hub
        where = ddir / "wikitext-2" / f"{fname}.txt" if ddir else "wikitext-2/<split>.txt under --data-dir"
        raise LeanfmError(
            f"dataset wikitext2 ({fname}) not found at {where} and not downloadable; "
            "pass --data-dir (or set LEANFM_DATA_DIR) to a folder holding wikitext-2/test.txt"
        ) from None


def _gensim_wiki() -> str:
    from ..models.cache import cache_root

    cached = cache_root() / "data" / "gensim-wiki-v1.txt"  # bump when the cleaning changes
    if cached.exists():
        return cached.read_text(encoding="utf-8")
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError:
        raise LeanfmError("dataset gensim-wiki needs gensim; install it with: pip install gensim==4.4.0") from None
    import bz2

    articles = []
    with bz2.open(datapath(_GENSIM_FILE), "rb") as f:
        for title, text, _pageid in extract_pages(f):
            if not text or text.lower().startswith("#redirect"):
                continue
            clean = re.sub(r"'{2,}", "", filter_wiki(text))  # bold/italic quote markup survives filter_wiki
            clean = re.sub(r"\n{3,}", "\n\n", clean).strip()
            if len(clean) > 200:
                articles.append(f"{title}\n\n{clean}")
    out = "\n\n".join(articles)
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".partial")
    tmp.write_text(out, encoding="utf-8")
    os.replace(tmp, cached)
    return out


def load_text(name: str, split: str = "test", data_dir_: str | os.PathLike | None = None) -> str:
    """Return the evaluation/calibration text for a dataset name or a local ``.txt`` path."""
    if name == "wikitext2":
        return _wikitext2(split, data_dir(data_dir_))
    if name == "gensim-wiki":
        return _gensim_wiki()
    p = Path(name).expanduser()
    if p.suffix == ".txt" or p.exists():
        if not p.is_file():
            raise LeanfmError(f"text file '{name}' does not exist; pass an existing .txt file or one of: {', '.join(DATASETS)}")
        return p.read_text(encoding="utf-8", errors="replace")
    raise LeanfmError(f"unknown dataset '{name}'; use one of: {', '.join(DATASETS)}, or a path to a .txt file")
