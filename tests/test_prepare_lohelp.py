"""scripts/prepare_lohelp.py on a fake unpacked package tree that the test writes itself (no
download): three languages (en-US, de, ja), four help pages split train / valid / test by their
path's hash, with inline markup, entities, an inline switch, a block switch, an image, a code
paragraph, a short one, an untranslated one (differing from the English only in spacing), a
wrong-script one, a failed embed, duplicates, a near-duplicate of a test paragraph on a train
page and an id repeated on one page. Extraction, filtering, the split and the many-way test set
are checked line by line; the full pipeline (SentencePiece, fairseq-preprocess) is checked for
its layout."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPEC = importlib.util.spec_from_file_location("prepare_lohelp",
                                              REPO / "scripts" / "prepare_lohelp.py")
lohelp = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(lohelp)

# With --test-pages 0.25 --valid-pages 0.25 (their path hashes are checked below):
TRAIN_A = "text/shared/guide/tables.html"
TRAIN_C = "text/shared/01/open.html"
VALID = "text/shared/guide/charts.html"
TEST = "text/swriter/01/print.html"
SPLIT_FLAGS = ["--test-pages", "0.25", "--valid-pages", "0.25"]

HEAD = ('<!DOCTYPE html>\n<html><head><title>{title}</title></head><body>\n<div id="DisplayArea">'
        '\n<h1 id="hd_id1" dir="auto">Table of contents</h1>\n')  # a heading of < 4 words
TAIL = '\n</div><div id="SearchFrame"></div></body></html>\n'

# page -> lang -> the paragraphs' HTML (None: the language's page lacks the paragraph)
PAGES = {
    TRAIN_A: [
        {"en": '<h1 id="hd_id100" dir="auto">\n<a name="ins"></a>Inserting a new table</h1>',
         "de": '<h1 id="hd_id100" dir="auto">\n<a name="ins"></a>Einfügen einer neuen Tabelle</h1>',
         "ja": '<h1 id="hd_id100" dir="auto">\n<a name="ins"></a>新しい表の挿入</h1>'},
        # the same English as the test page's par_id101: held out, taken from there
        {"en": '<p id="par_id101" class="paragraph">Choose <span class="menuitem">Insert - '
               'Table</span> to open the <emph>dialog</emph>.</p>',
         "de": '<p id="par_id101" class="paragraph">Wählen Sie <span class="menuitem">Einfügen '
               '- Tabelle</span>, um den <emph>Dialog</emph> zu öffnen.</p>',
         "ja": '<p id="par_id101" class="paragraph"><span class="menuitem">挿入 → 表</span> '
               'を選択してダイアログを開きます。</p>'},
        # entities; ja untranslated (the English, spaced differently)
        {"en": '<p id="par_id102" class="paragraph">Rows &amp; columns can be added at any '
               'time.</p>',
         "de": '<p id="par_id102" class="paragraph">Zeilen &amp; Spalten k&ouml;nnen jederzeit '
               'hinzugef&#252;gt werden.</p>',
         "ja": '<p id="par_id102" class="paragraph">Rows &amp; columns can be added  at any '
               'time .</p>'},
        # an inline switch (only its default variant is kept), a no-break space, <br>; its
        # English is the train page C's par_id103 too, which comes first (page order)
        {"en": '<p id="par_id103" dir="auto">Press <span id="swlnsys_1" class="switchinline">'
               '<span hidden="true" id="MACtextshared_1" class="MAC"><span class="keycode">'
               'Command</span></span><span hidden="true" id="defaulttextshared_1"><span '
               'class="keycode">Ctrl</span></span></span><span class="keycode">+Enter</span> '
               'to insert a&nbsp;page break.<br>It starts a new page.</p>',
         "de": '<p id="par_id103" dir="auto">Drücken Sie <span class="switchinline"><span '
               'hidden="true" id="MACtextshared_1" class="MAC">Befehl</span><span hidden="true" '
               'id="defaulttextshared_1">Strg</span></span>+Eingabe, um einen Seitenumbruch '
               'einzufügen.<br>Er beginnt eine neue Seite.</p>',
         "ja": '<p id="par_id103" dir="auto"><span class="switchinline"><span hidden="true" '
               'id="MACtextshared_1" class="MAC">Command</span><span hidden="true" '
               'id="defaulttextshared_1">Ctrl</span></span>+Enter キーを押して改ページを挿入します。'
               '<br>新しいページが始まります。</p>'},
        # an image (no text) and a link; ja: Latin letters, not the English: wrong script
        {"en": '<p id="par_id104" class="paragraph">Click the <img src="media/x.svg" '
               'alt="Icon Table" class="iconimage"> icon or <a target="_top" '
               'href="en-US/text/x.html">open the <span class="emph">Table</span> menu</a>.</p>',
         "de": '<p id="par_id104" class="paragraph">Klicken Sie auf das <img src="media/x.svg" '
               'alt="Symbol"> Symbol oder <a href="de/text/x.html">öffnen Sie das Menü <span '
               'class="emph">Tabelle</span></a>.</p>',
         "ja": '<p id="par_id104" class="paragraph">Click the <img src="media/x.svg" '
               'alt="Icon"> icon or open the Table menu now.</p>'},
        # code: not extracted at all
        {"en": '<p id="par_id105" class="code">TABLE(Rows; Columns; Name)</p>',
         "de": '<p id="par_id105" class="code">TABELLE(Zeilen; Spalten; Name)</p>',
         "ja": '<p id="par_id105" class="code">TABLE(行; 列; 名前)</p>'},
        # three words: too short
        {"en": '<p id="par_id106">See also tables.</p>',
         "de": '<p id="par_id106">Siehe auch Tabellen.</p>',
         "ja": '<p id="par_id106">表も参照してください。</p>'},
        # a block switch: a whole hidden paragraph (a platform's variant) is kept
        {"en": '<span class="switch"><span hidden="true" id="WINtextx_1" class="WIN"><div '
               'class="tip"><p id="par_id107" dir="auto">On Windows, tables can also be pasted '
               'from Excel.</p></div></span></span>',
         "de": '<span class="switch"><span hidden="true" id="WINtextx_1" class="WIN"><div '
               'class="tip"><p id="par_id107" dir="auto">Unter Windows können Tabellen auch aus '
               'Excel eingefügt werden.</p></div></span></span>',
         "ja": '<span class="switch"><span hidden="true" id="WINtextx_1" class="WIN"><div '
               'class="tip"><p id="par_id107" dir="auto">Windows では、Excel から表を貼り付ける'
               'こともできます。</p></div></span></span>'},
    ],
    TRAIN_C: [
        # the same English as page A's par_id103, another translation: this one is first
        {"en": '<p id="par_id103">Press Ctrl+Enter to insert a page break. It starts a new '
               'page.</p>',
         "de": '<p id="par_id103">Mit Strg+Eingabe fügen Sie einen Seitenumbruch ein. Er '
               'beginnt eine neue Seite.</p>',
         "ja": '<p id="par_id103">Ctrl+Enter で改ページを挿入します。新しいページが始まります。</p>'},
        # missing from the ja page
        {"en": '<p id="par_id300">Opening a document restores its tables.</p>',
         "de": '<p id="par_id300">Beim Öffnen eines Dokuments werden seine Tabellen '
               'wiederhergestellt.</p>',
         "ja": None},
        # the test page's par_id101 but for case and punctuation: held out from training
        {"en": '<p id="par_id301">choose Insert: Table, to open the dialog!</p>',
         "de": '<p id="par_id301">Wählen Sie Einfügen: Tabelle, um den Dialog zu öffnen!</p>',
         "ja": '<p id="par_id301">挿入: 表 を選択してダイアログを開きます！</p>'},
    ],
    VALID: [
        {"en": '<p id="par_id400">Charts show the data of a table.</p>',
         "de": '<p id="par_id400">Diagramme zeigen die Daten einer Tabelle.</p>',
         "ja": '<p id="par_id400">グラフは表のデータを表示します。</p>'},
    ],
    TEST: [
        {"en": '<p id="par_id101" class="paragraph">Choose Insert - Table to open the '
               'dialog.</p>',
         "de": '<p id="par_id101" class="paragraph">Wählen Sie Einfügen - Tabelle, um den Dialog '
               'zu öffnen.</p>',
         "ja": '<p id="par_id101" class="paragraph">挿入 → 表 を選択してダイアログを開きます。</p>'},
        # ja: a failed embed instead of the text
        {"en": '<p id="par_id200">Printing a table prints its borders too.</p>',
         "de": '<p id="par_id200">Beim Drucken einer Tabelle werden auch ihre Umrandungen '
               'gedruckt.</p>',
         "ja": '<p id="par_id200">[text/swriter/01/print.xhp#print_head not found].</p>'},
        # an embedded section repeats an id: keys par_id201 and par_id201#2, the second a
        # duplicate
        *2 * [{"en": '<div class="embedded"><p id="par_id201">Select the cells you want to '
                     'print.</p></div>',
               "de": '<div class="embedded"><p id="par_id201">Wählen Sie die Zellen, die Sie '
                     'drucken möchten.</p></div>',
               "ja": '<div class="embedded"><p id="par_id201">印刷するセルを選択します。</p></div>'}],
    ],
}
FOLDERS = {"en": "en-US", "de": "de", "ja": "ja"}

EXPECTED = {  # (split, lang) -> [(English, translation)]
    ("train", "de"): [
        ("Press Ctrl+Enter to insert a page break. It starts a new page.",
         "Mit Strg+Eingabe fügen Sie einen Seitenumbruch ein. Er beginnt eine neue Seite."),
        ("Opening a document restores its tables.",
         "Beim Öffnen eines Dokuments werden seine Tabellen wiederhergestellt."),
        ("Inserting a new table", "Einfügen einer neuen Tabelle"),
        ("Rows & columns can be added at any time.",
         "Zeilen & Spalten können jederzeit hinzugefügt werden."),
        ("Click the icon or open the Table menu.",
         "Klicken Sie auf das Symbol oder öffnen Sie das Menü Tabelle."),
        ("On Windows, tables can also be pasted from Excel.",
         "Unter Windows können Tabellen auch aus Excel eingefügt werden."),
    ],
    ("valid", "de"): [("Charts show the data of a table.",
                       "Diagramme zeigen die Daten einer Tabelle.")],
    ("test", "de"): [
        ("Choose Insert - Table to open the dialog.",
         "Wählen Sie Einfügen - Tabelle, um den Dialog zu öffnen."),
        ("Printing a table prints its borders too.",
         "Beim Drucken einer Tabelle werden auch ihre Umrandungen gedruckt."),
        ("Select the cells you want to print.", "Wählen Sie die Zellen, die Sie drucken möchten."),
    ],
    ("train", "ja"): [
        ("Press Ctrl+Enter to insert a page break. It starts a new page.",
         "Ctrl+Enter で改ページを挿入します。新しいページが始まります。"),
        ("Inserting a new table", "新しい表の挿入"),
        ("On Windows, tables can also be pasted from Excel.",
         "Windows では、Excel から表を貼り付けることもできます。"),
    ],
    ("valid", "ja"): [("Charts show the data of a table.", "グラフは表のデータを表示します。")],
    ("test", "ja"): [
        ("Choose Insert - Table to open the dialog.", "挿入 → 表 を選択してダイアログを開きます。"),
        ("Select the cells you want to print.", "印刷するセルを選択します。"),
    ],
}
EXPECTED_COUNTS = {  # 14 English paragraphs of >= 4 words, 11 distinct
    "de": {"train": 6, "valid": 1, "test": 3, "covered": 11, "coverage": 1.0, "eligible": 14,
           "untranslated": 0, "wrong_script": 0, "broken": 0, "duplicate": 2, "off_split": 2,
           "capped": 0},
    "ja": {"train": 3, "valid": 1, "test": 2, "covered": 7, "coverage": round(7 / 11, 4),
           "eligible": 14, "untranslated": 2, "wrong_script": 1, "broken": 1, "duplicate": 2,
           "off_split": 2, "capped": 0},
}


def make_tree(work: Path):
    """<work>/pkg/<lang>/usr/share/libreoffice/help/<folder>/text/... as dpkg -x leaves it."""
    for lang, folder in FOLDERS.items():
        root = work / "pkg" / lang / "usr/share/libreoffice/help" / folder
        for page, paragraphs in PAGES.items():
            body = "\n".join(p[lang] for p in paragraphs if p[lang] is not None)
            (root / page).parent.mkdir(parents=True, exist_ok=True)
            (root / page).write_text(HEAD.format(title=page) + body + TAIL, encoding="utf-8")
    return work


def args_for(tmp_path, *extra):
    return lohelp.parse_args(["--work-dir", str(tmp_path / "work"), "--results-dir",
                              str(tmp_path / "results"), "--langs", "de,ja", *SPLIT_FLAGS,
                              *extra])


def read(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_pages_hash_to_the_splits_the_fixture_assumes():
    assert [lohelp.page_split(p, 0.25, 0.25) for p in (TRAIN_A, TRAIN_C, VALID, TEST)] == \
        ["train", "train", "valid", "test"]


def test_parse_page_markup_entities_switches():
    html = ('<p id="par_id1">A &lt;b&gt; &amp; &#8211; <span class="switchinline"><span '
            'hidden="true" id="MACx" class="MAC">Cmd</span><span hidden="true" id="defaultx">'
            'Ctrl</span></span>+C <img src="x.png" alt="no">\n  copies.</p>'
            '<p id="other">not a paragraph</p><h2 id="hd_id2">Head<br>line</h2>'
            '<p id="par_id1">again</p><p id="par_id3" class="smathcode">a over b</p>'
            '<p id="par_id4">unclosed <span>span<p id="par_id5">next')
    assert lohelp.parse_page(html) == [("par_id1", "A <b> & – Ctrl+C copies."),
                                       ("hd_id2", "Head line"), ("par_id1#2", "again"),
                                       ("par_id4", "unclosed span"), ("par_id5", "next")]


def test_script_share_and_untranslated():
    assert lohelp.script_share("Ctrl+Enter で改ページを挿入します。", "ja") == 11 / 13
    assert lohelp.script_share("Выберите Сервис (LibreOffice Draw)", "ru") == 2 / 4
    assert lohelp.script_share("Click the icon", "de") == 1.0
    assert not lohelp.translated("Select the icon .", "Select the icon.", "de", 0.5)
    assert not lohelp.translated("Open it here.", "Open it now.", "ja", 0.5)
    assert lohelp.translated("Open it here.", "Öffnen Sie es hier.", "de", 0.5)


def test_extract_filter_split(tmp_path):
    args = args_for(tmp_path)
    make_tree(args.work_dir)
    langs = args.all_langs
    lohelp.step_extract(args, langs)
    en = read(args.work_dir / "extract" / "en.tsv")
    assert f"{TEST}\tpar_id201#2\tSelect the cells you want to print." in en
    assert f"{TRAIN_A}\tpar_id103\tPress Ctrl+Enter to insert a page break. It starts a new " \
           "page." in en
    assert not any("\tpar_id105\t" in line for line in en)  # code
    assert len(en) == len(read(args.work_dir / "extract" / "de.tsv")) == 19

    lohelp.check_settings(args)
    stats = lohelp.step_align(args)
    text = args.work_dir / "text"
    for (split, lang), pairs in EXPECTED.items():
        assert read(text / f"{split}.en-{lang}.en") == [e for e, _ in pairs], (split, lang)
        assert read(text / f"{split}.en-{lang}.{lang}") == [t for _, t in pairs], (split, lang)
    assert stats["langs"] == EXPECTED_COUNTS
    assert stats["english_paragraphs"] == 14 and stats["english_distinct"] == 11
    assert stats["pages"] == {"train": 2, "valid": 1, "test": 1}

    # split by page: every held-out paragraph comes from its split's page, and no test or valid
    # English (up to case and punctuation) is in any training data
    english_of = {p: {line.split("\t")[2] for line in en if line.startswith(p + "\t")}
                  for p in PAGES}
    for lang in ("de", "ja"):
        assert set(read(text / f"test.en-{lang}.en")) <= english_of[TEST]
        assert set(read(text / f"valid.en-{lang}.en")) <= english_of[VALID]
        assert set(read(text / f"train.en-{lang}.en")) <= english_of[TRAIN_A] | english_of[TRAIN_C]
    train = {lohelp.norm_key(t) for lang in ("de", "ja")
             for t in read(text / f"train.en-{lang}.en")}
    held = {lohelp.norm_key(t) for lang in ("de", "ja") for s in ("valid", "test")
            for t in read(text / f"{s}.en-{lang}.en")}
    assert not train & held

    split_tsv = ["page\tsplit", f"{TRAIN_C}\ttrain", f"{VALID}\tvalid", f"{TRAIN_A}\ttrain",
                 f"{TEST}\ttest"]
    assert read(args.results_dir / "split.tsv") == split_tsv
    assert read(args.work_dir / "pages.tsv") == split_tsv[1:]
    table = read(args.results_dir / "corpus.md")
    assert "| en-de | Latin | 6 | 1 | 3 | 100.0% |" in table
    assert "| en-ja | Han + kana | 3 | 1 | 2 | 63.6% |" in table
    record = json.loads((args.results_dir / "corpus.json").read_text())
    assert record["langs"] == EXPECTED_COUNTS and record["settings"]["langs"] == ["de", "ja"]

    # a second run skips the step (a missing table is written again from stats.json); other
    # settings in the same folder are refused
    mtime = (text / "train.en-de.de").stat().st_mtime_ns
    assert lohelp.step_align(args) == stats
    (args.results_dir / "corpus.md").unlink()
    assert lohelp.step_align(args) == stats
    assert read(args.results_dir / "corpus.md") == table
    assert (text / "train.en-de.de").stat().st_mtime_ns == mtime
    with pytest.raises(SystemExit, match="other settings"):
        lohelp.check_settings(args_for(tmp_path, "--min-words", "3"))


def test_many_way_test_set(tmp_path):
    """test.many.tsv: the test paragraphs of every pair by (page, key), a pair's cells empty
    where it dropped the paragraph; X-Y's test set is where both are filled."""
    args = args_for(tmp_path)
    make_tree(args.work_dir)
    lohelp.step_extract(args, args.all_langs)
    lohelp.step_align(args)
    lohelp.step_many_way(args)
    rows = read(args.work_dir / "text" / "test.many.tsv")
    (en1, de1), (en2, de2), (en3, de3) = EXPECTED[("test", "de")]
    ja1, ja3 = (t for _, t in EXPECTED[("test", "ja")])
    assert rows == ["page\tkey\ten\tde\tja",
                    f"{TEST}\tpar_id101\t{en1}\t{de1}\t{ja1}",
                    f"{TEST}\tpar_id200\t{en2}\t{de2}\t",  # ja: a failed embed
                    f"{TEST}\tpar_id201\t{en3}\t{de3}\t{ja3}"]  # par_id201#2: a duplicate
    record = json.loads((args.results_dir / "test_many.json").read_text())
    assert record == {"paragraphs": 3, "langs": ["de", "ja"],
                      "directions": {"de-ja": 2, "ja-de": 2}}
    assert "| **de** |  | 2 |" in read(args.results_dir / "test_many.md")

    # resumable: skipped when it exists, a missing table written again from the TSV
    mtime = (args.work_dir / "text" / "test.many.tsv").stat().st_mtime_ns
    (args.results_dir / "test_many.json").unlink()
    lohelp.step_many_way(args)
    assert json.loads((args.results_dir / "test_many.json").read_text()) == record
    assert (args.work_dir / "text" / "test.many.tsv").stat().st_mtime_ns == mtime

    # the en and X columns must be the pair's own test files, line for line
    (args.work_dir / "text" / "test.many.tsv").unlink()
    (args.work_dir / "text" / "test.en-ja.ja").write_text("changed\n", encoding="utf-8")
    with pytest.raises(SystemExit, match="differs from text/test.en-ja.ja"):
        lohelp.step_many_way(args)


def test_caps_take_whole_pages_in_hash_order(tmp_path):
    args = args_for(tmp_path, "--max-test", "2")  # the test page has 3 (de): all dropped
    make_tree(args.work_dir)
    lohelp.step_extract(args, args.all_langs)
    stats = lohelp.step_align(args)
    assert stats["langs"]["de"]["test"] == 0 and stats["langs"]["de"]["capped"] == 3
    assert stats["langs"]["ja"]["test"] == 2 and stats["langs"]["ja"]["capped"] == 0
    items = [("p1", 1), ("p2", 2), ("p2", 3), ("p3", 4)]
    order = sorted({"p1", "p2", "p3"}, key=lohelp.page_hash)
    kept = lohelp.cap_pages(items, 2)
    assert {page for page, _ in kept} <= set(order[:2]) and len(kept) <= 2


def test_bad_languages_are_refused():
    for langs in ("zh-cn", "en,de", "de,de"):
        with pytest.raises(SystemExit):
            lohelp.parse_args(["--langs", langs])


def test_coverage_only(tmp_path):
    args = args_for(tmp_path, "--coverage-only")
    make_tree(args.work_dir)
    lohelp.main(["--work-dir", str(args.work_dir), "--results-dir", str(args.results_dir),
                 "--langs", "de,ja", "--coverage-only"])
    record = json.loads((args.results_dir / "candidates.json").read_text())
    assert record["english_distinct"] == 11
    assert {k: v["covered"] for k, v in record["langs"].items()} == {"de": 11, "ja": 7}
    assert record["langs"]["ja"]["wrong_script_paragraphs"] == 1
    assert record["langs"]["ja"]["broken_embed_paragraphs"] == 1
    assert not (args.work_dir / "settings.json").exists()


STUB_PREPROCESS = """#!{python}
# a stand-in for fairseq-preprocess: each .bin holds the text it was given, each .idx its name
import argparse, pathlib
p = argparse.ArgumentParser()
for flag in ("--source-lang", "--target-lang", "--trainpref", "--validpref", "--testpref",
             "--srcdict", "--tgtdict", "--destdir", "--workers"):
    p.add_argument(flag)
a = p.parse_args()
dest = pathlib.Path(a.destdir)
dest.mkdir(parents=True)
for split in ("train", "valid", "test"):
    for lang in (a.source_lang, a.target_lang):
        name = f"{{split}}.{{a.source_lang}}-{{a.target_lang}}.{{lang}}"
        text = pathlib.Path(getattr(a, split + "pref") + "." + lang).read_bytes()
        (dest / (name + ".bin")).write_bytes(text)
        (dest / (name + ".idx")).write_text(name)
(dest / "preprocess.log").write_text("stub")
"""


def check_layout(work: Path):
    """<work>/bin as scripts/prepare_multi30k.py lays it out: one dictionary for every language,
    each split of en-X and X-en (the same files), langs.txt, .done."""
    bindir = work / "bin"
    assert read(bindir / "langs.txt") == ["en,de,ja"]
    assert read(bindir / "pairs.txt") == ["en-de,de-en,en-ja,ja-en"]
    assert (bindir / ".done").exists()
    for lang in ("en", "de", "ja"):
        assert (bindir / f"dict.{lang}.txt").read_bytes() == (work / "dict.txt").read_bytes()
    for x in ("de", "ja"):
        for split in ("train", "valid", "test"):
            for side in ("en", x):
                for ext in ("bin", "idx"):
                    a = bindir / f"{split}.en-{x}.{side}.{ext}"
                    b = bindir / f"{split}.{x}-en.{side}.{ext}"
                    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0
    assert read(work / "text" / "test.many.tsv")[0] == "page\tkey\ten\tde\tja"
    pieces = read(work / "spm" / "test.en-ja.ja")
    assert len(pieces) == 2 and all(line.startswith("\u2581") for line in pieces)
    dictionary = read(work / "dict.txt")
    assert all(line.endswith(" 100") for line in dictionary)
    assert not {"<unk>", "<s>", "</s>", "<pad>"} & {line.split()[0] for line in dictionary}


def test_pipeline_with_a_stub_preprocess(tmp_path, monkeypatch, capsys):
    """SentencePiece, encoding and the bin step's layout, fairseq-preprocess stubbed (fast)."""
    pytest.importorskip("sentencepiece")
    work, results = tmp_path / "work", tmp_path / "results"
    make_tree(work)
    stub = tmp_path / "fairseq-preprocess"
    stub.write_text(STUB_PREPROCESS.format(python=sys.executable))
    stub.chmod(0o755)
    monkeypatch.setattr(lohelp, "find_preprocess", lambda: str(stub))
    argv = ["--work-dir", str(work), "--results-dir", str(results), "--langs", "de,ja",
            "--vocab-size", "120", *SPLIT_FLAGS]
    lohelp.main(argv)
    check_layout(work)
    # the stub's .bin is its input: the encoded text of the pair, for both directions
    assert (work / "bin" / "test.ja-en.ja.bin").read_bytes() == \
        (work / "spm" / "test.en-ja.ja").read_bytes()
    assert (work / "bin" / "train.de-en.en.bin").read_bytes() == \
        (work / "spm" / "train.en-de.en").read_bytes()
    assert "[lohelp] step 6/6 bin 2/2 en-ja: fairseq-preprocess" in capsys.readouterr().out
    lohelp.main(argv)  # a re-run skips every step
    out = capsys.readouterr().out
    assert "fairseq-preprocess" not in out and "step 4/6 spm: exists, skipped" in out


@pytest.mark.slow
def test_full_pipeline_real_preprocess(tmp_path):
    """The script end to end with the real fairseq-preprocess (about a minute: fairseq's import
    per pair), in a subprocess as `make lohelp` runs it."""
    pytest.importorskip("sentencepiece")
    if not (Path(sys.executable).parent / "fairseq-preprocess").exists():
        pytest.skip("no fairseq-preprocess next to this Python (run `make venv`)")
    work, results = tmp_path / "work", tmp_path / "results"
    make_tree(work)
    cmd = [sys.executable, str(REPO / "scripts" / "prepare_lohelp.py"), "--work-dir", str(work),
           "--results-dir", str(results), "--langs", "de,ja", "--vocab-size", "120",
           *SPLIT_FLAGS]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "[lohelp] step 6/6 bin 2/2 en-ja: fairseq-preprocess" in out
    check_layout(work)
    from fairseq.data import Dictionary, data_utils

    dictionary = Dictionary.load(str(work / "bin" / "dict.ja.txt"))
    data = data_utils.load_indexed_dataset(str(work / "bin" / "test.ja-en.ja"), dictionary)
    assert len(data) == 2
    # the test line's characters that training lacks are pieces outside the vocabulary
    known = {line.split()[0] for line in read(work / "dict.txt")}
    pieces = read(work / "spm" / "test.en-ja.ja")[1].split()
    assert dictionary.string(data[1]) == " ".join(p if p in known else "<unk>" for p in pieces)
