"""Translation engines behind the server: one loaded sub-network, translating a batch of inputs.

Both wrap the project's own Python APIs: `ct2.CT2Translator` (a CTranslate2 export) and
`hub.load_translator` (fairseq's GeneratorHubInterface on a pruned or whole checkpoint). Each
`translate` call is ONE batch call of the engine (the batcher decides what goes in it) and returns
the n best hypotheses (decoded text) of every input. Inputs are source pieces, tokenized once by
the service (`Service._encode`, with the same SentencePiece model the export carries; without
one, whitespace-separated dictionary tokens), without language tokens: the engine adds those of
the pair asked.

Inputs longer than the model's source positions are never cut: `max_input_tokens` is what the
caller must check (the service refuses such a sentence with TooLong), and the engine is told not
to truncate (CTranslate2's `max_input_length=0`; fairseq raises on an over-long input). Outputs
are bounded by `output_bound`: fairseq-generate's 200 tokens, or twice the longest source when
that is more, within the decoder's positions (`max_positions`: max_target_positions).
"""

import threading
from argparse import Namespace
from typing import List, Sequence

DEFAULT_OUTPUT_TOKENS = 200  # fairseq-generate's bound (max_len_a 0, max_len_b 200)


def output_bound(longest_source: int, max_positions: int) -> int:
    """Target tokens an engine may generate for a batch whose longest source has
    `longest_source` tokens: fairseq-generate's 200, so that ordinary inputs are translated
    exactly as fairseq-generate translates them, but never less than 2 x the source + 16, so
    that a long sentence (the splitter lets through up to the model's positions) is not cut
    at 200 tokens; at most what the decoder's positions allow."""
    return min(max(DEFAULT_OUTPUT_TOKENS, 2 * longest_source + 16), max_positions - 1)


class CT2Engine:
    """A CTranslate2 export. Threads, not processes: CTranslate2 is not fork-safe. It runs up
    to `calls` translate calls at once from different threads (CTranslate2's inter_threads;
    the weights are shared), each on one thread.

    The language tokens are those of the pair asked (`CT2Translator.tokens`), so an export that
    serves several pairs (`*-de`; `*-*`, a model without task-routed layers, exported once)
    translates each into its own target. Inputs are bounded by the encoder's positions, outputs
    by the decoder's."""

    backend = "ctranslate2"

    def __init__(self, model_dir: str, calls: int = 1, max_source_positions: int = 1024,
                 max_target_positions: int = 1024):
        from ..ct2 import CT2Translator

        # `calls` engine calls at once (inter_threads), one thread each: the batcher's budget
        # decides how many run, so threads are never over-subscribed (intra_threads=0 would
        # be OMP_NUM_THREADS or 4 per call)
        self.mt = CT2Translator(model_dir, intra_threads=1, inter_threads=calls)
        self.max_positions = max_target_positions  # what output_bound bounds: the decoder's
        self.max_input_tokens = max_source_positions - 2  # language token and </s>

    def group_key(self, src: str, tgt: str):
        """Requests with equal keys can share one engine call: the same language tokens."""
        source, target = self.mt.tokens(src, tgt)
        return tuple(source), tuple(target)

    def translate(self, pieces: Sequence[List[str]], src: str, tgt: str, beam: int,
                  nbest: int = 1) -> List[List[str]]:
        if not pieces:
            return []
        prefix, target_prefix = self.mt.tokens(src, tgt)
        sources = [prefix + list(p) for p in pieces]
        bound = output_bound(max(len(s) for s in sources) + 1, self.max_positions)
        results = self.mt.translator.translate_batch(
            sources, target_prefix=[target_prefix] * len(pieces) if target_prefix else None,
            beam_size=max(beam, nbest), num_hypotheses=nbest, max_input_length=0,
            max_decoding_length=bound + len(target_prefix))
        return [[self.mt.decode(h[len(target_prefix):]) for h in r.hypotheses] for r in results]


class FairseqEngine:
    """A fairseq checkpoint (pruned, or whole when its layers cannot be pruned) through the
    project's hub interface. fairseq's multilingual task is built for one direction (it loads
    the dictionaries and language tokens of --source-lang / --target-lang), so each direction
    gets its own task and hub interface around the SAME loaded model: one copy of the weights
    serves every pair of the sub-network (`*-de`: en-de and fr-de). One call at a time, on
    torch's threads (the server sets them to --threads)."""

    backend = "fairseq"

    def __init__(self, checkpoint: str, data: str, spm_model: str, pair):
        from fairseq import utils

        from ..hub import load_translator

        first = load_translator(checkpoint, data=data, spm_model=spm_model,
                                source_lang=pair[0], target_lang=pair[1])
        first.eval()
        self.hubs = {tuple(pair): first}
        self.lock = threading.Lock()
        positions = utils.resolve_max_positions(first.task.max_positions(),
                                                *[m.max_positions() for m in first.models])
        src_positions = positions[0] if isinstance(positions, tuple) else positions
        tgt_positions = positions[1] if isinstance(positions, tuple) else positions
        self.max_input_tokens = int(src_positions) - 2  # language token and </s>
        self.max_positions = int(tgt_positions)

    def _hub(self, src: str, tgt: str):
        """The hub interface of one direction, sharing the first one's model."""
        hub = self.hubs.get((src, tgt))
        if hub is None:
            import copy

            from fairseq import tasks
            from omegaconf import open_dict

            from ..hub import TaskMoEHubInterface

            first = next(iter(self.hubs.values()))
            cfg = copy.deepcopy(first.cfg)
            with open_dict(cfg):
                # a legacy task's cfg.task is an argparse Namespace that deepcopy of the
                # DictConfig keeps BY REFERENCE: copy it, or every direction would rewrite the
                # first one's languages (KeyError on its dictionaries when it is used again)
                if isinstance(cfg.task, Namespace):
                    cfg.task = Namespace(**vars(cfg.task))
                cfg.task.source_lang, cfg.task.target_lang = src, tgt
            hub = TaskMoEHubInterface(cfg, tasks.setup_task(cfg.task), list(first.models))
            hub.bpe, hub.tokenizer = first.bpe, first.tokenizer
            hub.eval()
            self.hubs[(src, tgt)] = hub
        return hub

    def group_key(self, src: str, tgt: str):
        return src, tgt

    def param_bytes(self) -> int:
        first = next(iter(self.hubs.values()))
        return sum(p.numel() * p.element_size() for m in first.models for p in m.parameters())

    def translate(self, pieces: Sequence[List[str]], src: str, tgt: str, beam: int,
                  nbest: int = 1) -> List[List[str]]:
        if not pieces:
            return []
        with self.lock:
            hub = self._hub(src, tgt)
            # hub.encode(text) is binarize(apply_bpe(text)): the pieces are apply_bpe's output
            tokens = [hub.binarize(" ".join(p)) for p in pieces]
            bound = output_bound(max(len(t) for t in tokens), self.max_positions)
            batched = hub.generate(tokens, beam=max(beam, nbest), nbest=nbest, max_len_a=0,
                                   max_len_b=bound)
            return [[hub.decode(h["tokens"]) for h in hypos[:nbest]] for hypos in batched]
