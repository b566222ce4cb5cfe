"""research.langid_eval on a tiny many-way test set: accuracy per language and method, the
wrong answers counted, the files written."""

import json

import pytest

from research import langid_eval

ROWS = [  # en, de, ja ("": the pair dropped it)
    ("Choose Insert - Table to open the dialog.",
     "Wählen Sie Einfügen - Tabelle, um den Dialog zu öffnen.", "挿入 → 表 を選択してダイアログを開きます。"),
    ("Select the cells you want to print.", "Wählen Sie die Zellen, die Sie drucken möchten.", ""),
    ("Rows and columns can be added at any time.", "Rows and columns can be added at any time.",
     "行と列はいつでも追加できます。"),
]
TSV = "page\tkey\ten\tde\tja\n" + "".join(f"p.html\tpar_id{i}\t" + "\t".join(r) + "\n"
                                          for i, r in enumerate(ROWS))


def test_accuracy_per_language(tmp_path):
    pytest.importorskip("py3langid")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "test.many.tsv").write_text(TSV, encoding="utf-8")
    langid_eval.main(["--text", str(tmp_path / "text"), "--out", str(tmp_path), "--name", "t"])
    record = json.loads((tmp_path / "langid-t.json").read_text())
    langs = record["languages"]
    assert list(langs) == ["en", "de", "ja"]
    assert langs["en"]["restricted"] == {"accuracy": 1.0, "n": 3, "wrong": {}}
    # German's third paragraph is English (left untranslated in this fixture)
    assert langs["de"]["restricted"] == {"accuracy": round(2 / 3, 4), "n": 3,
                                         "wrong": {"en": 1}}
    assert langs["ja"]["restricted"]["n"] == 2 and langs["ja"]["restricted"]["accuracy"] == 1.0
    assert langs["de"]["stop_words"]["n"] == 3 and "stop_words" not in langs["ja"]
    assert record["mean"]["restricted"] == round((1 + 2 / 3 + 1) / 3, 4)
    md = (tmp_path / "langid-t.md").read_text()
    assert "| de | 3 | 66.7% (en 1) |" in md
