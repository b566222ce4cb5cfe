import pytest

from fairseq_taskmoe.langid import (LANGS, Detector, detect, detector_for, identify,
                                     language_shares, ranked, votes)

CAPTIONS = {
    "en": "A man in an orange hat starring at something.",
    "de": "Ein Mann mit einem orangefarbenen Hut, der etwas anstarrt.",
    "fr": "Un homme avec un chapeau orange regardant quelque chose.",
    "cs": "Muž v oranžovém klobouku na něco zírá.",
}


def test_detects_each_language():
    assert set(CAPTIONS) == set(LANGS)
    for lang, sentence in CAPTIONS.items():
        assert detect(sentence) == lang, (lang, votes(sentence))


def test_no_evidence_or_tie_is_none():
    assert detect("") is None
    assert detect("12345 !!") is None
    assert detect("Boston Terrier") is None
    assert detect("a") is None  # "a" is English and Czech: a tie


def test_letters_only_one_language_writes_decide():
    assert detect("Straße") == "de"
    assert detect("řeka") == "cs"
    assert detect("garçon") == "fr"


def test_french_elision_is_split():
    assert detect("l'homme d'affaires") == "fr"


def test_language_shares():
    shares = language_shares([CAPTIONS["de"], CAPTIONS["fr"], "", CAPTIONS["de"]], "de")
    assert shares == {"on_target": 0.5, "off_target": 0.25, "undetected": 0.25}
    assert language_shares([], "de") == {"on_target": 0.0, "off_target": 0.0, "undetected": 0.0}


# ---------------------------------------------------------------- py3langid (the langid extra)

SENTENCES = {  # LoHelp-like help text, one per script
    "en": "Choose Insert - Table to open the dialog.",
    "el": "Επιλέξτε Εισαγωγή - Πίνακας για να ανοίξετε το παράθυρο διαλόγου.",
    "ru": "Выберите Вставка - Таблица, чтобы открыть диалоговое окно.",
    "zh": "选择插入 - 表格以打开对话框。",
    "ja": "挿入 → 表 を選択してダイアログを開きます。",
}


def test_identify_many_scripts_and_restriction():
    pytest.importorskip("py3langid")
    langs = ["en", "de", "fr", "el", "ru", "zh", "ja"]
    for lang, sentence in SENTENCES.items():
        assert identify(sentence, langs) == lang, (lang, ranked(sentence, langs)[:3])
    assert identify("12345 !!", langs) is None and ranked("", langs) == []
    # restricted to two languages, the probabilities are renormalised over them
    two = ranked(SENTENCES["ru"], ["de", "ru"])
    assert [lang for lang, _ in two] == ["ru", "de"] and abs(sum(p for _, p in two) - 1) < 1e-6
    # our codes that are not ISO codes: zhtw is py3langid's zh
    assert identify(SENTENCES["zh"], ["en", "zhtw"]) == "zhtw"
    with pytest.raises(ValueError, match="xx"):
        identify("text", ["en", "xx"])
    assert "zxx" not in [lang for lang, _ in ranked("Hello world, how are you?")]


def test_detector_for_keeps_stop_words_for_the_four():
    pytest.importorskip("py3langid")
    four = ("en", "de", "fr", "cs")
    assert detector_for(list(four)) == Detector("stop-words", four)
    assert detector_for(["en", "de"])(CAPTIONS["de"]) == "de"
    many = detector_for(["en", "de", "ja"])
    assert many.method == "py3langid" and many(SENTENCES["ja"]) == "ja"
    shares = language_shares([SENTENCES["ja"], SENTENCES["en"], "123"], "ja", many)
    assert shares == {"on_target": 1 / 3, "off_target": 1 / 3, "undetected": 1 / 3}
