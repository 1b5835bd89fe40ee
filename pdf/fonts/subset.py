#!/usr/bin/env python3
"""Rebuild the small fonts in this folder: the CJK ideographs and emoji llm.org uses.

The fonts inside the `typst` wheel (Libertinus Serif, New Computer Modern, DejaVu Sans
Mono) have no CJK ideographs and no emoji, and the weave ignores system fonts so that
every machine makes the same PDF. So the few such characters the book uses are cut out
of Noto Sans CJK and Noto Color Emoji (both SIL Open Font License 1.1, which allows
subsetting and redistribution) into two small files kept here.

The weave warns, with the llm.org line, about a character of those kinds that these
files lack. Then, on a machine with the Noto fonts (Debian: apt-get install
fonts-noto-cjk fonts-noto-color-emoji), run

    .venv/bin/python pdf/fonts/subset.py llm.org

and commit the two files. Needs fontTools (installed with matplotlib).
"""
import sys
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection, TTFont

HERE = Path(__file__).resolve().parent
CJK_SOURCE = Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc")
EMOJI_SOURCE = Path("/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf")
CJK_OUT, EMOJI_OUT = HERE / "book-cjk.otf", HERE / "book-emoji.ttf"


def is_cjk(cp: int) -> bool:
    return (0x2E80 <= cp <= 0x9FFF or 0xAC00 <= cp <= 0xD7AF or 0xF900 <= cp <= 0xFAFF
            or 0xFF00 <= cp <= 0xFFEF or 0x20000 <= cp <= 0x3FFFF)


def is_emoji(cp: int) -> bool:
    return 0x1F000 <= cp <= 0x1FAFF or cp in (0x200D, 0xFE0F)


def cut(font: TTFont, chars: set[str], out: Path) -> None:
    options = subset.Options()
    options.layout_features = ["*"]        # emoji sequences (skin tones, ZWJ) are ligatures
    options.name_IDs = ["*"]               # keep the names and the license notice
    options.notdef_outline = True
    sub = subset.Subsetter(options)
    sub.populate(unicodes=sorted(ord(c) for c in chars))
    sub.subset(font)
    font.save(out)


def main(org: str) -> None:
    text = Path(org).read_text(encoding="utf-8")
    cjk = {c for c in text if is_cjk(ord(c))}
    emoji = {c for c in text if is_emoji(ord(c))}
    if cjk:
        fonts = TTCollection(str(CJK_SOURCE)).fonts
        sc = next(f for f in fonts if "SC" in f["name"].getDebugName(1))
        cut(sc, cjk, CJK_OUT)
    if emoji:
        cut(TTFont(str(EMOJI_SOURCE)), emoji, EMOJI_OUT)
    print(f"{len(cjk)} CJK characters -> {CJK_OUT.name}, {len(emoji)} emoji -> {EMOJI_OUT.name}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "llm.org")
