"""research.pivot_eval on a tiny many-way test set, the service faked: its routes are the real
route planner's (serve.routes.plan_routes) for an English-centric target / target model; its
translation is perfect through trained legs and a copy of the source zero-shot (so pivot scores
100 BLEU and 0% off-target, zero-shot 100% off-target). What is checked: the directions chosen,
the paragraphs each direction gets (translated into both languages, seeded sample, --limit),
the --pairs each service is built with, per-target BLEU tokenizers, the detector, the files."""

import json
from types import SimpleNamespace

import pytest

from fairseq_taskmoe.serve.routes import ModelFacts, plan_routes
from research import pivot_eval
from research.study import corpus

LANGS = ["en", "de", "fr", "ja"]
TRAINED = [p for x in LANGS[1:] for p in (f"en-{x}", f"{x}-en")]
ROWS = [  # en, de, fr, ja ("" : that pair dropped the paragraph)
    ("Choose Insert - Table to open the dialog.",
     "Wählen Sie Einfügen - Tabelle, um den Dialog zu öffnen.",
     "Choisissez Insertion - Tableau pour ouvrir la boîte de dialogue.",
     "挿入 → 表 を選択してダイアログを開きます。"),
    ("Printing a table prints its borders too.",
     "Beim Drucken einer Tabelle werden auch ihre Umrandungen gedruckt.",
     "Imprimer un tableau imprime aussi ses bordures.", ""),
    ("Select the cells you want to print.", "Wählen Sie die Zellen, die Sie drucken möchten.",
     "Sélectionnez les cellules que vous voulez imprimer.", "印刷するセルを選択します。"),
    ("Charts show the data of a table.", "Diagramme zeigen die Daten einer Tabelle.", "",
     "グラフは表のデータを表示します。"),
    ("Opening a document restores its tables.",
     "Beim Öffnen eines Dokuments werden seine Tabellen wiederhergestellt.",
     "L’ouverture d’un document restaure ses tableaux.", "ドキュメントを開くと表が復元されます。"),
    ("Rows and columns can be added at any time.",
     "Zeilen und Spalten können jederzeit hinzugefügt werden.",
     "Les lignes et les colonnes peuvent être ajoutées à tout moment.", "行と列はいつでも追加できます。"),
]


def fake_lohelp(root):
    """work/lohelp as the evaluation reads it: bin/langs.txt, bin/pairs.txt, text/test.many.tsv."""
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "langs.txt").write_text(",".join(LANGS) + "\n")
    (root / "bin" / "pairs.txt").write_text(",".join(TRAINED) + "\n")
    (root / "text").mkdir()
    lines = ["page\tkey\t" + "\t".join(LANGS)]
    lines += [f"text/p{i // 3}.html\tpar_id{i}\t" + "\t".join(row) for i, row in enumerate(ROWS)]
    (root / "text" / "test.many.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


class FakeService:
    """The service's surface pivot_eval uses, with the real routes."""

    def __init__(self, pivot, pairs, langs=LANGS, trained=TRAINED, rows=ROWS):
        facts = ModelFacts(tuple(langs), tuple(tuple(p.split("-")) for p in trained),
                           ("target", "target"))
        allowed = None if pairs == "all" else [tuple(p.split("-")) for p in pairs.split(",")]
        self.langs = list(langs)
        self.routes = plan_routes(facts, pivot, allowed)
        self.rows = {(lang, row[i]): row for row in rows for i, lang in enumerate(langs)}
        self.index = {lang: i for i, lang in enumerate(langs)}
        self.batcher = SimpleNamespace(close=lambda: None)
        self.calls = []

    def route(self, src, tgt):
        return self.routes[(src, tgt)]

    async def translate(self, texts, src, tgt):
        route = self.routes[(src, tgt)]
        assert route.available, route.why
        self.calls.append((src, tgt, len(texts)))
        if route.kind == "zero-shot":
            return list(texts), [[] for _ in texts], route
        return [self.rows[(src, t)][self.index[tgt]] for t in texts], [[] for _ in texts], route


@pytest.fixture
def fake_services(monkeypatch):
    built = {}

    def service_for(args, pivot, pairs="all"):
        built[pivot] = FakeService(pivot, pairs, *(
            (["en", "de", "fr", "cs"], [p for x in "de fr cs".split()
                                        for p in (f"en-{x}", f"{x}-en")], MULTI30K_ROWS)
            if args.corpus == "multi30k" else ()))
        built[pivot].pairs = pairs
        return built[pivot]

    monkeypatch.setattr(pivot_eval, "service_for", service_for)
    return built


def test_ring_takes_every_language_once_each_way():
    langs = ["en", *"de fr cs it nl el es pl zh tr ru sv ja fi".split()]
    ring = pivot_eval.ring(langs)
    assert ring[:2] == ["de-fr", "fr-cs"] and ring[-2:] == ["ja-fi", "fi-de"]
    assert len(ring) == 14 and not any("en" in d.split("-") for d in ring)
    assert sorted(d.split("-")[0] for d in ring) == sorted(langs[1:])
    assert sorted(d.split("-")[1] for d in ring) == sorted(langs[1:])


def test_many_way_pairs(tmp_path):
    columns = corpus.read_many_way(fake_lohelp(tmp_path) / "text")
    assert list(columns) == LANGS
    src, ref = corpus.many_way_pair(columns, "fr", "ja")  # rows 0, 2, 4, 5
    assert src == [ROWS[i][2] for i in (0, 2, 4, 5)] and ref == [ROWS[i][3] for i in (0, 2, 4, 5)]
    assert corpus.many_way_pair(columns, "en", "de") == ([r[0] for r in ROWS], [r[1] for r in ROWS])
    with pytest.raises(ValueError, match="fi"):
        corpus.many_way_pair(columns, "de", "fi")
    with pytest.raises(FileNotFoundError, match="prepare_lohelp"):
        corpus.read_many_way(tmp_path)


def test_lohelp_pivot_vs_zero_shot(tmp_path, fake_services, capsys):
    pytest.importorskip("py3langid")
    root = fake_lohelp(tmp_path / "lohelp")
    out = tmp_path / "results"
    pivot_eval.main(["ckpt.pt", "--corpus", "lohelp", "--data", str(root / "bin"),
                     "--text", str(root / "text"), "--spm-model", "spm.model", "--name", "t",
                     "--cap", "4", "--out", str(out)])
    # services: the pivoted one for the ring and the trained directions, the direct one for
    # the ring only
    ring = ["de-fr", "fr-ja", "ja-de"]
    assert fake_services["auto"].pairs == ",".join(ring + TRAINED)
    assert fake_services["none"].pairs == ",".join(ring)
    result = json.loads((out / "pivot_eval-t.json").read_text())
    assert [d["pair"] for d in result["directions"]] == ring
    # de-fr: rows 0, 1, 2, 4, 5 -> a seeded sample of 4; fr-ja and ja-de: 4 rows each
    assert [d["sentences"] for d in result["directions"]] == [4, 4, 4]
    keep = corpus.sample_indices(5, 4, corpus.CAP_SEED)
    de_fr = result["directions"][0]
    assert de_fr["examples"][0]["source"] == [ROWS[i][1] for i in (0, 1, 2, 4, 5)][keep[0]]
    # BLEU into Japanese needs sacreBLEU's MeCab tokenizer (sacrebleu[ja]); without it, none
    mecab = corpus.ja_mecab_available()
    for d in result["directions"]:
        assert d["via"] == "en"
        into_ja = d["pair"].endswith("-ja")
        assert d["pivot"]["bleu"] == (None if into_ja and not mecab else 100.0)
        assert d["pivot"]["chrf"] == 100.0
        assert d["pivot"]["off_target"] == 0.0
        assert d["zero_shot"]["off_target"] == 1.0
        if into_ja and not mecab:
            assert d["zero_shot"]["bleu"] is None
        else:
            assert d["zero_shot"]["bleu"] < 10
    assert result["directions"][1]["pivot"]["bleu_tokenize"] == ("ja-mecab" if mecab else None)
    assert result["directions"][2]["pivot"]["bleu_tokenize"] == "13a"
    assert result["langid_method"] == "py3langid"
    assert result["langid_accuracy"] == {"fr": 1.0, "ja": 1.0, "de": 1.0}
    assert result["average"]["zero_shot"]["off_target"] == 1.0
    assert result["cap"] == 4 and "ring" in result["directions_chosen"]
    # the trained directions as served: all six, en-X on the pair's paragraphs
    assert [d["pair"] for d in result["trained"]] == sorted(TRAINED)
    assert {d["pair"]: d["sentences"] for d in result["trained"]}["en-ja"] == 4
    md = (out / "pivot_eval-t.md").read_text()
    assert "| de-fr (via en) | 100.00 | 100.0 | 0.0% |" in md
    assert "LoHelp's many-way test set" in md and "4 sentences" in md
    assert "fr-ja: pivot via en BLEU" in capsys.readouterr().out


def test_lohelp_directions_option(tmp_path, fake_services):
    pytest.importorskip("py3langid")
    root = fake_lohelp(tmp_path / "lohelp")
    argv = ["ckpt.pt", "--corpus", "lohelp", "--data", str(root / "bin"), "--text",
            str(root / "text"), "--name", "t", "--out", str(tmp_path / "r"), "--skip-trained"]
    pivot_eval.main(argv + ["--directions", "ja-fr,de-ja", "--limit", "2"])
    result = json.loads((tmp_path / "r" / "pivot_eval-t-first2.json").read_text())
    assert [(d["pair"], d["sentences"]) for d in result["directions"]] == [("ja-fr", 2),
                                                                          ("de-ja", 2)]
    assert result["trained"] == [] and fake_services["auto"].pairs == "ja-fr,de-ja"
    pivot_eval.main(argv + ["--directions", "all"])
    result = json.loads((tmp_path / "r" / "pivot_eval-t.json").read_text())
    assert len(result["directions"]) == 6
    with pytest.raises(SystemExit, match="fi-de"):
        pivot_eval.main(argv + ["--directions", "fi-de"])


MULTI30K_ROWS = [("A dog runs in the park with a ball.",
                  "Ein Hund rennt mit einem Ball im Park.",
                  "Un chien court dans le parc avec une balle.",
                  "Pes běží v parku s míčem."),
                 ("Two men are working on the street.",
                  "Zwei Männer arbeiten auf der Straße.",
                  "Deux hommes travaillent dans la rue.",
                  "Dva muži pracují na ulici.")]


def test_multi30k_unchanged(tmp_path, fake_services):
    """Multi30k: every pivoted direction, the parallel files, the stop-word detector, BLEU
    with sacreBLEU's defaults."""
    text = tmp_path / "text"
    text.mkdir()
    for i, lang in enumerate(["en", "de", "fr", "cs"]):
        (text / f"test.{lang}").write_text("".join(r[i] + "\n" for r in MULTI30K_ROWS))
    pivot_eval.main(["ckpt.pt", "--data", str(tmp_path), "--spm-model", "spm.model", "--text",
                     str(text), "--name", "m", "--out", str(tmp_path / "r")])
    result = json.loads((tmp_path / "r" / "pivot_eval-m.json").read_text())
    assert [d["pair"] for d in result["directions"]] == ["cs-de", "cs-fr", "de-cs", "de-fr",
                                                         "fr-cs", "fr-de"]
    assert fake_services["auto"].pairs == "all" and result["langid_method"] == "stop-words"
    assert result["langid_accuracy"] == {"en": 1.0, "de": 1.0, "fr": 1.0, "cs": 1.0}
    assert "bleu_tokenize" not in result["directions"][0]["pivot"]
    assert result["average"]["pivot"]["bleu"] == 100.0
    assert "Multi30k test_2016_flickr" in (tmp_path / "r" / "pivot_eval-m.md").read_text()
    with pytest.raises(SystemExit):
        pivot_eval.parse_args(["ckpt.pt", "--name", "m"])  # multi30k needs its paths
