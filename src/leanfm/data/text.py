"""Text datasets by name: ``wikitext2``, ``gensim-wiki``, or any local text file.

``wikitext2`` (WikiText-2 v1, tokenized with ``<unk>``) is read from
``<folder>/wikitext-2/<split>.txt``, the first folder that has it of: the user's folder
(``--data-dir``, else ``$LEANFM_DATA_DIR``) and the default ``<leanfm cache>/data``
(``~/.cache/leanfm/data``, or ``$LEANFM_CACHE/data``). Without a local copy the ``datasets`` library is tried when it is
installed and the hub is reachable. Lines are joined as in the GPTQ evaluation code: the Hugging
Face dataset stores each line with its newline and blank lines as ``""``, and the test text is
``"\n\n".join(lines)``.

``gensim-wiki`` is the ~480k-word Wikipedia sample packaged inside gensim, cleaned with
``filter_wiki`` once and cached; it is the default calibration source (calibrate on one corpus,
evaluate on another).

Every file is checked to be text before it is used: a file with NUL bytes (binary data, UTF-16)
or with more than :data:`MAX_INVALID_UTF8` of its characters invalid UTF-8 is refused, and so is
an empty one. :func:`check_dataset` runs the same checks cheaply (nothing is tokenized), so a
bad dataset fails before any model is loaded or measured.
"""
from __future__ import annotations

import importlib.util
import os
import re
from pathlib import Path

from ..errors import LeanfmError

DATASETS = ("wikitext2", "gensim-wiki")
WIKITEXT_SPLITS = {"test": "test", "valid": "valid", "validation": "valid", "train": "train"}  # --split -> file stem
MAX_INVALID_UTF8 = 0.01  # more than this fraction of undecodable characters: not UTF-8 text
_SNIFF_BYTES = 1 << 20  # check_dataset looks at the first MiB of a file
_GENSIM_FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_GENSIM_CACHE = "gensim-wiki-v1.txt"  # bump when the cleaning changes


def default_data_dir() -> Path:
    """``<leanfm cache>/data``: where datasets are found without ``--data-dir`` / ``$LEANFM_DATA_DIR``."""
    from ..models.cache import data_root

    return data_root()


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """The user's data folder: ``explicit`` (``--data-dir``) or ``$LEANFM_DATA_DIR`` (None without)."""
    d = explicit or os.environ.get("LEANFM_DATA_DIR")
    return Path(d).expanduser() if d else None


def data_dirs(explicit: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """Folders searched for local datasets, in order, each with how it was given: the user's
    folder (``explicit``, i.e. ``--data-dir``, which overrides ``$LEANFM_DATA_DIR``), then the
    default :func:`default_data_dir`."""
    found: list[tuple[Path, str]] = []
    if explicit:
        found.append((Path(explicit).expanduser(), "--data-dir"))
    elif os.environ.get("LEANFM_DATA_DIR"):
        found.append((Path(os.environ["LEANFM_DATA_DIR"]).expanduser(), "$LEANFM_DATA_DIR"))
    default = default_data_dir()
    if all(d != default for d, _ in found):
        found.append((default, "default"))
    return found


def join_lines(raw: str) -> str:
    """GPTQ/HF join: each line keeps its newline, blank lines are empty, joined by a blank line."""
    lines = ["" if not ln.strip() else ln for ln in raw.splitlines(keepends=True)]
    return "\n\n".join(lines)


# --- reading files as text, refusing what is not ---

def _decode(data: bytes, path: Path, partial: bool = False) -> str:
    """``data`` (the file ``path``, or its first bytes when ``partial``) as text, or one line
    saying why it is not text."""
    if b"\0" in data:
        raise LeanfmError(f"dataset {path} is not a text file (it contains NUL bytes: binary data, or UTF-16 text); "
                          "pass a UTF-8 text file (convert UTF-16 with: iconv -f UTF-16 -t UTF-8)")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        bad = text.count("\ufffd") - (1 if partial else 0)  # a character cut at the end of a sample
        if bad > MAX_INVALID_UTF8 * max(len(text), 1):
            raise LeanfmError(f"dataset {path} is not UTF-8 text ({bad} of its {len(text)} characters are invalid UTF-8); "
                              "pass a UTF-8 text file (convert with: iconv -f LATIN1 -t UTF-8)") from None
    return text.removeprefix("\ufeff")


def _empty(path: Path) -> LeanfmError:
    return LeanfmError(f"dataset {path} is empty (no text in it); pass a file with text in it")


def _read_text(path: Path) -> str:
    """The whole file ``path`` as text (checked: not binary, UTF-8, not empty)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LeanfmError(f"cannot read dataset {path}: {e.strerror or e}; check that the file is readable") from None
    text = _decode(data, path)
    if not text.strip():
        raise _empty(path)
    return text


def _sniff_text(path: Path) -> None:
    """:func:`_read_text`'s checks on the first MiB of ``path`` (the whole file when that part is blank)."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
            more = bool(f.read(1))
    except OSError as e:
        raise LeanfmError(f"cannot read dataset {path}: {e.strerror or e}; check that the file is readable") from None
    text = _decode(head, path, partial=more)
    if not text.strip():
        if more:
            _read_text(path)
        else:
            raise _empty(path)


# --- resolving names ---

def _split_only_for_wikitext(name: str, split: str) -> None:
    if split not in (None, "test"):
        raise LeanfmError(f"--split {split} applies only to wikitext2; dataset {name} is a single text (leave --split at test)")


def _wikitext2_file(split: str, explicit) -> Path | None:
    """The local ``wikitext-2/<split>.txt``; None when there is none but the ``datasets``
    library can fetch it; else one line saying where it looked and what it found."""
    fname = WIKITEXT_SPLITS.get(split)
    dirs = data_dirs(explicit)
    local = {d: sorted(p.stem for p in (d / "wikitext-2").glob("*.txt")) for d, _ in dirs if (d / "wikitext-2").is_dir()}
    if fname is None:
        have = "; found locally: " + "; ".join(f"{', '.join(s) or 'none'} in {d / 'wikitext-2'}" for d, s in local.items()) if local else ""
        raise LeanfmError(f"wikitext2 has no split '{split}'; its splits are test, valid (or validation) and train: "
                          f"pass --split test or --split valid{have}")
    if explicit and not Path(explicit).expanduser().is_dir():
        raise LeanfmError(f"--data-dir {explicit} is not an existing folder; pass the folder that holds wikitext-2/{fname}.txt "
                          "for dataset wikitext2")
    for d, _ in dirs:
        f = d / "wikitext-2" / f"{fname}.txt"
        if f.is_file():
            return f
    if importlib.util.find_spec("datasets") is not None:  # optional: pip install 'leanfm[hub]'
        from ..models.load import hub_reachable

        if hub_reachable():
            return None
    looked = ", ".join(f"{d}" + ("" if how == "default" else f" ({how})") for d, how in dirs)
    if explicit and os.environ.get("LEANFM_DATA_DIR"):
        looked += f" (not $LEANFM_DATA_DIR={os.environ['LEANFM_DATA_DIR']}: --data-dir overrides it)"
    have = [(d / "wikitext-2", s) for d, s in local.items() if s]
    if have:
        where, splits = have[0]
        raise LeanfmError(
            f"wikitext2 split '{split}' not found: looked for wikitext-2/{fname}.txt in {looked}; {where} has only "
            f"{', '.join(s + '.txt' for s in splits)}: pass --split {' or --split '.join(splits)}, or put {fname}.txt there")
    default = dirs[-1][0]
    raise LeanfmError(f"dataset wikitext2 not found: looked for wikitext-2/{fname}.txt in {looked}; put "
                      f"wikitext-2/{fname}.txt under {default}, or set LEANFM_DATA_DIR, or pass --data-dir")


def _wikitext2(split: str, explicit) -> str:
    f = _wikitext2_file(split, explicit)
    if f is not None:
        return join_lines(_read_text(f))
    import datasets

    fname = WIKITEXT_SPLITS[split]
    hf_split = "validation" if fname == "valid" else fname
    try:
        ds = datasets.load_dataset("wikitext", "wikitext-2-v1", split=hf_split)
    except Exception as e:  # noqa: BLE001 - any failure of the download: say so in one line
        raise LeanfmError(f"dataset wikitext2 ({hf_split}) is not local and could not be downloaded ({type(e).__name__}); put "
                          f"wikitext-2/{fname}.txt under {default_data_dir()}, or set LEANFM_DATA_DIR, or pass --data-dir") from None
    return "\n\n".join(ds["text"])


def _gensim_data() -> Path:
    """The bz2 Wikipedia sample inside the installed gensim (found without importing gensim)."""
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise LeanfmError("dataset gensim-wiki needs gensim; install it with: pip install gensim==4.4.0")
    f = Path(next(iter(spec.submodule_search_locations))) / "test" / "test_data" / _GENSIM_FILE
    if not f.is_file():
        raise LeanfmError(f"dataset gensim-wiki: gensim's sample {f} is missing; reinstall gensim (pip install --force-reinstall gensim==4.4.0)")
    return f


def _gensim_wiki() -> str:
    from ..models.cache import cache_root

    cached = cache_root() / "data" / _GENSIM_CACHE
    if cached.is_file() and cached.stat().st_size > 0:
        return cached.read_text(encoding="utf-8")
    _gensim_data()
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
        from gensim.test.utils import datapath
    except ImportError as e:
        raise LeanfmError(f"dataset gensim-wiki needs a working gensim ({e}); install it with: pip install gensim==4.4.0") from None
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
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".partial-{os.getpid()}")
        tmp.write_text(out, encoding="utf-8")
        os.replace(tmp, cached)
    except OSError:  # an unwritable cache only costs the cleaning again next time
        pass
    return out


def _local_file(name: str, flag: str | None = None) -> Path:
    """The text file a dataset name that is not a built-in refers to (or one line why not)."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if p.is_dir():
        raise LeanfmError(f"dataset {name} is a folder, not a text file; pass a text file or one of: {', '.join(DATASETS)}")
    if p.suffix or "/" in name or os.sep in name:
        raise LeanfmError(f"dataset file {name} does not exist; pass an existing text file or one of: {', '.join(DATASETS)}")
    raise LeanfmError(f"unknown dataset '{name}'{f' for {flag}' if flag else ''}; use one of: {', '.join(DATASETS)}, "
                      "or a path to a .txt file")


def load_text(name: str, split: str = "test", data_dir_: str | os.PathLike | None = None) -> str:
    """Return the evaluation/calibration text for a dataset name or a local text file."""
    if name == "wikitext2":
        return _wikitext2(split, data_dir_)
    _split_only_for_wikitext(name, split)
    if name == "gensim-wiki":
        return _gensim_wiki()
    return _read_text(_local_file(name))


def check_dataset(name: str, split: str = "test", data_dir: str | os.PathLike | None = None, flag: str | None = None) -> None:
    """Check cheaply, without reading it whole or tokenizing, that :func:`load_text` will find
    the dataset: a local file exists and is text, wikitext2's split file is found (or can be
    downloaded), gensim is installed for gensim-wiki. Raises the same one-line errors.
    ``flag`` (e.g. ``"--calib-dataset"``) names the option in the message for an unknown name."""
    if name == "wikitext2":
        f = _wikitext2_file(split, data_dir)
        if f is not None:
            _sniff_text(f)
        return
    _split_only_for_wikitext(name, split)
    if name == "gensim-wiki":
        from ..models.cache import cache_root

        cached = cache_root() / "data" / _GENSIM_CACHE
        if not (cached.is_file() and cached.stat().st_size > 0):
            _gensim_data()
        return
    _sniff_text(_local_file(name, flag))
