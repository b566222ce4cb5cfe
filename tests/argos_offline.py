"""Run by tests/test_export_argos.py with the Python of Argos Translate's own virtualenv
(`make argos-venv`: .venv-argos, unchanged argostranslate 1.11.0), never imported by the suite.

    python argos_offline.py blank-spacy LANG DIR
        spacy.blank(LANG) saved to DIR (a pipeline for --spacy-pipeline where .venv has no spaCy)
    python argos_offline.py translate PACKAGE SRC TGT < sentences.json
        installs PACKAGE with argostranslate.package.install_from_path into the folders the
        environment names (ARGOS_PACKAGES_DIR, XDG_*), translates each sentence with
        argostranslate.translate, and prints {"translations": [...], "connections": [...]}

Every socket connection is refused and recorded first: the package must work offline, and
`connections` lists what Argos (or a library under it) tried to reach.
"""

import json
import socket
import sys

connections = []


def _refuse(address):
    connections.append(repr(address))
    raise OSError(f"network disabled by argos_offline.py: {address!r}")


def block_network():
    """Refuse every connection and name lookup made through Python's socket module (urllib,
    requests, pip's own code, onnx/spaCy/stanza downloads all go through it)."""
    socket.socket.connect = lambda self, address: _refuse(address)
    socket.socket.connect_ex = lambda self, address: _refuse(address)
    socket.getaddrinfo = lambda host, *args, **kwargs: _refuse(host)
    socket.create_connection = lambda address, *args, **kwargs: _refuse(address)


def translate(package_file: str, src: str, tgt: str, sentences):
    from argostranslate import package, translate as argos

    package.install_from_path(package_file)
    installed = [(p.from_code, p.to_code, str(p.package_path)) for p in
                 package.get_installed_packages()]
    translation = argos.get_translation_from_codes(src, tgt)
    return {"installed": installed, "translations": [translation.translate(s) for s in sentences]}


def main(argv):
    block_network()
    if argv[0] == "blank-spacy":
        import spacy

        spacy.blank(argv[1]).to_disk(argv[2])
        out = {"spacy": spacy.__version__}
    else:
        out = translate(argv[1], argv[2], argv[3], json.load(sys.stdin))
    print(json.dumps({**out, "connections": connections}))


if __name__ == "__main__":
    main(sys.argv[1:])
