"""A deterministic text corpus built from the running Python installation's own documentation.

The bundled toy models are trained on text that every Python installation carries, so nothing
third-party is committed and everything can be rebuilt offline:

* ``pydoc_data.topics.topics``: the language-reference topics that ``help("if")`` shows
  (one document per topic, titled ``topic:<key>``);
* docstrings of a fixed, sorted list of standard-library modules (:data:`STDLIB_MODULES`:
  pure-Python modules plus a few built-in ones that every CPython has, such as ``builtins``,
  ``math`` and ``itertools``): one document per module (``module:<name>``: the module docstring
  followed by its public functions) and one per public class (``class:<module>.<Class>``: the
  class docstring followed by its public methods and properties).

Only objects defined in the module itself are used (re-exports are skipped), members are sorted
by name, signatures show only parameter names and simple literal defaults (so no memory
addresses or hash-seed-dependent reprs leak in), and documents are sorted by title. The split is
a fixed function of the title: ``blake2b(title) mod 20 == 0`` goes to ``"validation"``, the rest
to ``"train"``.

**Version dependence.** Different Python versions (and distributions that strip
``pydoc_data``) produce slightly different corpora: docstrings change between releases and some
modules come and go. For a fixed installation the corpus is identical from run to run and
independent of ``PYTHONHASHSEED`` and of what the calling process has imported (the corpus is
built in a fresh ``python -I -S`` subprocess that can see only the standard library). On
CPython 3.11 it holds about 1.9 MB of text in ~1400 documents. Modules that fail to import are
skipped silently; modules with import side effects (``this``, ``antigravity``, ``idlelib``,
``tkinter``, ``turtle*``, ...), the test suite, deprecated "dead batteries" (PEP 594) and
platform-specific modules are never imported. Third-party packages are never imported.

Public API: :func:`build_corpus`, :func:`iter_documents` (plus :func:`titled_documents`,
:func:`document_split` and :func:`corpus_stats`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import inspect
import io
import json
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

__all__ = [
    "EXCLUDED_MODULES",
    "SPLITS",
    "STDLIB_MODULES",
    "VALIDATION_MODULUS",
    "build_corpus",
    "corpus_stats",
    "document_split",
    "iter_documents",
    "titled_documents",
]

SPLITS: tuple[str, ...] = ("train", "validation")
#: A document goes to "validation" iff ``blake2b(title) % VALIDATION_MODULUS == 0`` (about 5%).
VALIDATION_MODULUS: int = 20

#: The standard-library modules whose docstrings enter the corpus (sorted): pure-Python modules
#: plus a few built-in ones present in every CPython (builtins, math, itertools, sys, ...).
#: Names missing from a given Python version are skipped.
STDLIB_MODULES: tuple[str, ...] = tuple(
    sorted(
        """
        abc argparse array ast asyncio asyncio.base_events asyncio.base_futures asyncio.base_subprocess
        asyncio.base_tasks asyncio.constants asyncio.coroutines asyncio.events asyncio.exceptions
        asyncio.format_helpers asyncio.futures asyncio.locks asyncio.log asyncio.mixins
        asyncio.protocols asyncio.queues asyncio.runners asyncio.selector_events asyncio.sslproto
        asyncio.staggered asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks
        asyncio.threads asyncio.timeouts asyncio.transports asyncio.trsock asyncio.unix_events
        base64 bdb binascii bisect builtins bz2 cProfile calendar cmath cmd code codecs codeop collections collections.abc
        colorsys compileall concurrent.futures concurrent.futures.process
        concurrent.futures.thread configparser contextlib contextvars copy copyreg csv ctypes
        ctypes.util dataclasses datetime dbm dbm.dumb decimal difflib dis doctest email
        email.base64mime email.charset email.contentmanager email.encoders email.errors
        email.feedparser email.generator email.header email.headerregistry email.iterators
        email.message email.mime.application email.mime.audio email.mime.base email.mime.image
        email.mime.message email.mime.multipart email.mime.nonmultipart email.mime.text
        email.parser email.policy email.quoprimime email.utils enum filecmp fileinput fnmatch
        fractions ftplib functools gc genericpath getopt getpass gettext glob graphlib gzip hashlib
        heapq hmac html html.entities html.parser http http.client http.cookiejar http.cookies
        http.server imaplib importlib importlib.abc importlib.machinery importlib.metadata
        importlib.resources importlib.resources.abc importlib.util inspect io ipaddress itertools json
        json.decoder json.encoder json.scanner keyword linecache locale logging logging.config
        logging.handlers lzma mailbox marshal math mimetypes modulefinder multiprocessing
        multiprocessing.connection multiprocessing.context multiprocessing.dummy
        multiprocessing.heap multiprocessing.managers multiprocessing.pool
        multiprocessing.process multiprocessing.queues multiprocessing.reduction
        multiprocessing.shared_memory multiprocessing.sharedctypes multiprocessing.spawn
        multiprocessing.synchronize multiprocessing.util netrc numbers opcode operator optparse
        os pathlib pdb pickle pickletools pkgutil platform plistlib poplib posixpath pprint
        profile pstats pty py_compile pyclbr pydoc queue quopri random re reprlib rlcompleter
        sched secrets selectors shelve shlex shutil signal smtplib socket socketserver sqlite3
        sqlite3.dump ssl stat statistics string stringprep struct subprocess symtable sys sysconfig
        tabnanny tarfile tempfile textwrap threading time timeit token tokenize tomllib trace
        traceback tracemalloc tty types typing unittest unittest.async_case unittest.case
        unittest.loader unittest.main unittest.mock unittest.result unittest.runner
        unittest.signals unittest.suite unittest.util urllib.error urllib.parse urllib.request
        urllib.response urllib.robotparser uuid warnings wave weakref webbrowser wsgiref
        wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.types wsgiref.util
        wsgiref.validate xml.dom xml.dom.NodeFilter xml.dom.domreg xml.dom.expatbuilder
        xml.dom.minicompat xml.dom.minidom xml.dom.pulldom xml.dom.xmlbuilder
        xml.etree.ElementInclude xml.etree.ElementPath xml.etree.ElementTree xml.sax
        xml.sax.expatreader xml.sax.handler xml.sax.saxutils xml.sax.xmlreader xmlrpc.client
        xmlrpc.server zipapp zipfile zlib zoneinfo
        """.split()
    )
)

#: Never imported (side effects, GUI, test suite, deprecated or platform-specific modules).
#: :data:`STDLIB_MODULES` contains none of these; the set guards against edits to that list.
EXCLUDED_MODULES: frozenset[str] = frozenset(
    """
    __hello__ __phello__ antigravity this idlelib tkinter turtle turtledemo test lib2to3
    ensurepip distutils site sitecustomize usercustomize curses readline msvcrt winreg winsound
    aifc asynchat asyncore audioop cgi cgitb chunk crypt imghdr imp mailcap msilib nis nntplib
    ossaudiodev pipes smtpd sndhdr spwd sunau telnetlib uu xdrlib sre_compile sre_constants
    sre_parse pydoc_data
    """.split()
)

_MAX_SIGNATURE_CHARS = 240
_SIMPLE_DEFAULT_TYPES = (bool, int, float, str, bytes, type(None))


def _is_excluded(modname: str) -> bool:
    parts = modname.split(".")
    return any(".".join(parts[: i + 1]) in EXCLUDED_MODULES for i in range(len(parts))) or any(
        p.startswith("_") or p.startswith("test") for p in parts
    )


def _import_quietly(modname: str):
    """Import a standard-library module with warnings and stdout/stderr output suppressed."""
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        warnings.simplefilter("ignore")
        return importlib.import_module(modname)


def _own_doc(obj) -> str | None:
    """The object's own docstring (not inherited), cleaned; None if absent or empty."""
    try:
        doc = obj.__doc__
    except Exception:
        return None
    if not isinstance(doc, str):
        return None
    doc = inspect.cleandoc(doc).strip()
    return doc or None


def _format_default(value) -> str:
    # Only short literals; strings that look like paths (e.g. ``sys.executable``) would make the
    # corpus depend on where Python is installed.
    if isinstance(value, _SIMPLE_DEFAULT_TYPES):
        text = repr(value)
        if len(text) <= 40 and not (isinstance(value, (str, bytes)) and any(c in text for c in "/\\")):
            return text
    return "..."


def _signature(obj) -> str:
    """``(a, b=1, *args, c=..., **kw)``: names and simple literal defaults only ('' if unknown)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError, RuntimeError):
        return ""
    parts: list[str] = []
    seen_kw_only_marker = False
    seen_positional_only = False
    for p in sig.parameters.values():
        if p.kind is p.POSITIONAL_ONLY:
            seen_positional_only = True
        elif seen_positional_only:
            parts.append("/")
            seen_positional_only = False
        if p.kind is p.KEYWORD_ONLY and not seen_kw_only_marker:
            parts.append("*")
            seen_kw_only_marker = True
        if p.kind is p.VAR_POSITIONAL:
            parts.append("*" + p.name)
            seen_kw_only_marker = True
        elif p.kind is p.VAR_KEYWORD:
            parts.append("**" + p.name)
        elif p.default is p.empty:
            parts.append(p.name)
        else:
            parts.append(f"{p.name}={_format_default(p.default)}")
    if seen_positional_only:
        parts.append("/")
    text = "(" + ", ".join(parts) + ")"
    return text if len(text) <= _MAX_SIGNATURE_CHARS else "(...)"


def _indent(text: str, prefix: str = "    ") -> str:
    return "\n".join(prefix + line if line.strip() else "" for line in text.splitlines())


def _is_routine(obj) -> bool:
    return inspect.isroutine(obj)


def _class_document(modname: str, name: str, cls) -> str | None:
    pieces: list[str] = []
    doc = _own_doc(cls)
    bases = [b.__name__ for b in getattr(cls, "__bases__", ()) if b is not object]
    header = f"class {name}" + (f"({', '.join(bases)})" if bases else "") + ":"
    pieces.append(header)
    if doc:
        pieces.append(_indent(doc))
    n_members = 0
    for attr in sorted(vars(cls)):
        if attr.startswith("_") and attr != "__init__":
            continue
        raw = vars(cls)[attr]
        if isinstance(raw, (classmethod, staticmethod)):
            func, kind = raw.__func__, type(raw).__name__
        elif isinstance(raw, property):
            func, kind = raw, "property"
        elif _is_routine(raw):
            func, kind = raw, "method"
        else:
            continue
        mdoc = _own_doc(func)
        if not mdoc:
            continue
        if kind == "property":
            head = f"    property {attr}"
        else:
            prefix = "" if kind == "method" else f"@{kind}\n    "
            head = f"    {prefix}def {attr}{_signature(func)}:"
        pieces.append(head + "\n" + _indent(mdoc, "        "))
        n_members += 1
    if not doc and n_members == 0:
        return None
    return f"# {modname}.{name}\n\n" + "\n\n".join(pieces) + "\n"


def _module_documents(modname: str, module) -> list[tuple[str, str]]:
    """[(title, text)] for one module: the module document and one per public class."""
    docs: list[tuple[str, str]] = []
    functions: list[str] = []
    classes: list[tuple[str, object]] = []
    for name in sorted(vars(module)):
        if name.startswith("_"):
            continue
        obj = vars(module)[name]
        if getattr(obj, "__module__", None) != modname:
            continue
        if inspect.isclass(obj):
            classes.append((name, obj))
        elif _is_routine(obj):
            fdoc = _own_doc(obj)
            if fdoc:
                functions.append(f"def {name}{_signature(obj)}:\n" + _indent(fdoc))
    mdoc = _own_doc(module)
    if mdoc or functions:
        body = f"# module {modname}\n\n" + (mdoc + "\n\n" if mdoc else "") + "\n\n".join(functions)
        docs.append((f"module:{modname}", body.rstrip() + "\n"))
    for name, cls in classes:
        text = _class_document(modname, name, cls)
        if text:
            docs.append((f"class:{modname}.{name}", text))
    return docs


def _topic_documents() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics  # part of the standard library (may be stripped)
    except ImportError:
        return []
    docs = []
    for key in sorted(topics):
        text = topics[key].strip()
        if text:
            docs.append((f"topic:{key}", f"# {key}\n\n{text}\n"))
    return docs


def document_split(title: str) -> str:
    """The split ("train" or "validation") of a document, a fixed function of its title."""
    digest = hashlib.blake2b(title.encode("utf-8"), digest_size=8).digest()
    return "validation" if int.from_bytes(digest, "big") % VALIDATION_MODULUS == 0 else "train"


def _build_titled_in_process() -> list[tuple[str, str]]:
    docs: dict[str, str] = {}
    for title, text in _topic_documents():
        docs[title] = text
    for modname in STDLIB_MODULES:
        if _is_excluded(modname):
            continue
        try:
            module = _import_quietly(modname)
        except Exception:  # missing in this Python version / platform
            continue
        for title, text in _module_documents(modname, module):
            docs.setdefault(title, text)
    return sorted(docs.items())


@functools.lru_cache(maxsize=1)
def _build_titled() -> tuple[tuple[str, str], ...]:
    """Build the corpus in a fresh ``python -I -S`` subprocess.

    A fresh, isolated interpreter (no site-packages, no environment variables) sees the standard
    library exactly as installed: packages imported by the caller cannot leak in (transformers,
    for instance, adds methods to ``logging.Logger`` and other libraries patch ``inspect``), and
    the caller's process is not touched by importing ~250 modules. Falls back to building in
    this process (with a warning) if no subprocess can be run.
    """
    try:
        proc = subprocess.run(
            [sys.executable, "-I", "-S", str(Path(__file__).resolve()), "--dump-json"],
            capture_output=True,
            check=True,
            timeout=300,
        )
        return tuple((str(t), str(x)) for t, x in json.loads(proc.stdout.decode("ascii")))
    except Exception as exc:  # e.g. no usable sys.executable (embedded interpreters)
        warnings.warn(
            f"building the toy corpus in a subprocess failed ({exc!r}); building it in-process, where "
            "packages imported earlier may alter some docstrings",
            RuntimeWarning,
            stacklevel=2,
        )
        return tuple(_build_titled_in_process())


def titled_documents(split: str | None = None) -> list[tuple[str, str]]:
    """``[(title, text)]`` sorted by title, for one split or (``split=None``) all documents."""
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [(t, x) for t, x in _build_titled() if split is None or document_split(t) == split]


def build_corpus() -> dict[str, list[str]]:
    """Build (once per process; cached) the corpus: ``{"train": [...], "validation": [...]}``.

    Each value is a list of document texts in a deterministic order (sorted by title). The
    returned lists are fresh copies, so callers may modify them.
    """
    return {split: [text for _, text in titled_documents(split)] for split in SPLITS}


def iter_documents(split: str) -> Iterator[str]:
    """Iterate over the documents of ``split`` ("train" or "validation") in corpus order."""
    for _, text in titled_documents(split):
        yield text


def corpus_stats() -> dict[str, object]:
    """Sizes of the corpus, for model cards: documents and characters per split."""
    stats: dict[str, object] = {"python_version": sys.version.split()[0]}
    for split in SPLITS:
        docs = titled_documents(split)
        stats[split] = {"documents": len(docs), "characters": sum(len(t) for _, t in docs)}
    return stats


if __name__ == "__main__" and sys.argv[1:] == ["--dump-json"]:
    # Used by _build_titled(): run as ``python -I -S corpus.py --dump-json``. ASCII-only output.
    sys.stdout.write(json.dumps(_build_titled_in_process(), ensure_ascii=True))
