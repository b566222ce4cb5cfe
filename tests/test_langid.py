from fairseq_taskmoe.langid import LANGS, detect, language_shares, votes

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
