"""Build sentiment_adjectives.csv (Bing opinion-lexicon adjectives with their polarity) from Debian's r-cran-tidytext.

Run once by hand, without installing R:
`apt-get download r-cran-tidytext && dpkg -x r-cran-tidytext_0.4.1-1_all.deb tt && pip install rdata &&
python make_sentiment_adjectives.py tt/usr/lib/R/site-library/tidytext/data > sentiment_adjectives.csv`.
The output is committed; mdxlib never needs R, rdata or the Debian package. See README.md for provenance.
"""
import gzip
import struct
import sys
import warnings
import zlib
from pathlib import Path

import rdata


def parse(raw: bytes):
    with warnings.catch_warnings():  # lazy-load records carry no RDS header, which rdata warns about
        warnings.simplefilter("ignore", UserWarning)
        return rdata.conversion.convert(rdata.parser.parse_data(raw))


def read_object(data: Path, name: str):
    "One object of the R lazy-load database Rdata.rdx/.rdb: an offset/length index into zlib records."
    index = parse(gzip.decompress((data / "Rdata.rdx").read_bytes()))
    offset, length = (int(v) for v in index["variables"][name])
    record = (data / "Rdata.rdb").read_bytes()[offset:offset + length]
    raw = zlib.decompress(record[4:])  # a 4-byte big-endian uncompressed size, then the zlib stream
    assert len(raw) == struct.unpack(">I", record[:4])[0]
    return parse(raw)


def main(data: Path) -> None:
    sentiments = read_object(data, "sentiments")  # Bing lexicon: word, sentiment (positive / negative)
    pos = read_object(data, "parts_of_speech")  # Moby part-of-speech list: word, pos
    adjectives = set(pos.loc[pos["pos"] == "Adjective", "word"].astype(str))
    rows = {}
    for word, label in zip(sentiments["word"].astype(str), sentiments["sentiment"].astype(str)):
        # single lower-case alphabetic words that the POS list calls adjectives; a word listed with both polarities is dropped
        if word.isalpha() and word.islower() and word in adjectives:
            rows[word] = None if word in rows and rows[word] != label else label
    print("word,label")
    for word in sorted(w for w, lab in rows.items() if lab):
        print(f"{word},{rows[word]}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
