"""translation_task_moe: translation_multi_simple_epoch plus correct per-row language ids.

Batches of translation_multi_simple_epoch mix language pairs; the stock `--enable-lang-ids` puts
one id on a whole mixed batch. Here every language-pair dataset is wrapped so that each example
carries its own source/target language index (into --langs), and the collater turns them into
`net_input["src_lang_idx"]` / `net_input["tgt_lang_idx"]` ([B] long) in the batch's row order.
That holds for training, validation, fairseq-generate, fairseq-interactive and the hub interface.
"""

import inspect
import json
import logging

import torch
from fairseq.data import BaseWrapperDataset
from fairseq.data.multilingual.multilingual_data_manager import MultilingualDatasetManager
from fairseq.tasks import register_task
from fairseq.tasks.translation_multi_simple_epoch import TranslationMultiSimpleEpochTask

from ..distributed.sharding import expert_parallel_build
from ..moe.pairs import serves

logger = logging.getLogger(__name__)

TASK_NAME = "translation_task_moe"


class LangIdDataset(BaseWrapperDataset):
    """Adds `src_lang_idx` / `tgt_lang_idx` to every example and, per row, to the batch."""

    def __init__(self, dataset, src_lang_idx: int, tgt_lang_idx: int):
        super().__init__(dataset)
        self.src_lang_idx = src_lang_idx
        self.tgt_lang_idx = tgt_lang_idx

    def __getitem__(self, index):
        item = self.dataset[index]
        item["src_lang_idx"] = self.src_lang_idx
        item["tgt_lang_idx"] = self.tgt_lang_idx
        return item

    def collater(self, samples, **extra_args):
        """May receive examples of other pairs (mixed batches use the first dataset's collater),
        so the ids are read from each example, never from `self`."""
        if len(samples) == 0:
            return {}
        # The inner collater reorders rows by length; give examples their list position as a
        # temporary id to learn that order, then restore the real ids (which may collide across
        # pairs, being positions inside each pair's dataset).
        real_ids = [s["id"] for s in samples]
        batch = self.dataset.collater([dict(s, id=i) for i, s in enumerate(samples)],
                                      **extra_args)
        if not batch:
            return batch
        order = batch["id"].tolist()
        batch["id"] = torch.tensor([real_ids[i] for i in order], dtype=torch.long)
        net_input = batch["net_input"]
        net_input["src_lang_idx"] = torch.tensor([samples[i]["src_lang_idx"] for i in order])
        net_input["tgt_lang_idx"] = torch.tensor([samples[i]["tgt_lang_idx"] for i in order])
        return batch

    def num_tokens_vec(self, indices):
        return self.dataset.num_tokens_vec(indices)

    def __getattr__(self, name):  # src, tgt, src_sizes, ... of the wrapped LanguagePairDataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


class LangIdDatasetManager(MultilingualDatasetManager):
    """Wraps every language-pair dataset it loads in a LangIdDataset."""

    def load_a_dataset(self, split, data_path, src, src_dict, tgt, tgt_dict, combine, **kwargs):
        dataset = super().load_a_dataset(split, data_path, src, src_dict, tgt, tgt_dict, combine,
                                         **kwargs)
        return LangIdDataset(dataset, self.langs.index(src), self.langs.index(tgt))


@register_task(TASK_NAME)
class TranslationTaskMoE(TranslationMultiSimpleEpochTask):
    """translation_multi_simple_epoch (same flags) giving task-MoE models per-row language ids.
    Requires --langs (or --lang-dict): the language order fixes the ids the gates learn."""

    provides_task_ids = True  # checked by the task_moe model at start-up

    def __init__(self, args, langs, dicts, training):
        if not (getattr(args, "langs", None) or getattr(args, "lang_dict", None)):
            raise ValueError(
                f"--task {TASK_NAME} needs --langs (e.g. --langs en,de,fr,cs) or --lang-dict: "
                "the language order fixes the task ids the gates are trained on, so it must be "
                "given explicitly and be the same for training and generation"
            )
        if getattr(args, "lang_tok_replacing_bos_eos", False):
            raise ValueError(f"--lang-tok-replacing-bos-eos is not supported by --task {TASK_NAME}")
        super().__init__(args, langs, dicts, training)
        self.data_manager = LangIdDatasetManager(
            args, self.lang_pairs, langs, dicts, self.sampling_method
        )
        for lang in (args.source_lang, args.target_lang):
            if lang is not None and lang not in langs:
                raise ValueError(f"language {lang!r} is not in --langs {','.join(langs)}")

    def lang_index(self, lang: str) -> int:
        return self.langs.index(lang)

    def build_dataset_for_inference(self, src_tokens, src_lengths, constraints=None):
        if self.args.source_lang is None or self.args.target_lang is None:
            raise ValueError(
                f"--task {TASK_NAME} needs --source-lang and --target-lang to translate")
        dataset = super().build_dataset_for_inference(src_tokens, src_lengths, constraints)
        return LangIdDataset(dataset, self.lang_index(self.args.source_lang),
                             self.lang_index(self.args.target_lang))

    def build_generator(self, models, args, seq_gen_cls=None, extra_gen_cls_kwargs=None,
                        prefix_allowed_tokens_fn=None):
        """The parent lacks the prefix_allowed_tokens_fn argument that fairseq's hub interface
        passes; accept it (unsupported, as in the parent, when actually set)."""
        if prefix_allowed_tokens_fn is not None:
            raise NotImplementedError(f"prefix_allowed_tokens_fn is not supported by {TASK_NAME}")
        return super().build_generator(models, args, seq_gen_cls, extra_gen_cls_kwargs)

    def inference_step(self, generator, models, sample, prefix_tokens=None, constraints=None):
        """fairseq-interactive builds its own batches with only src_tokens/src_lengths: rows then
        get the ids of the pair being translated (--source-lang/--target-lang)."""
        net_input = sample["net_input"]
        if "src_lang_idx" not in net_input and self.args.source_lang and self.args.target_lang:
            rows = net_input["src_tokens"].new_ones(net_input["src_tokens"].size(0))
            net_input["src_lang_idx"] = rows * self.lang_index(self.args.source_lang)
            net_input["tgt_lang_idx"] = rows * self.lang_index(self.args.target_lang)
        return super().inference_step(generator, models, sample, prefix_tokens, constraints)

    def build_model(self, args, from_checkpoint=False):
        """fairseq-train builds the model to train it (from_checkpoint False): with W > 1 ranks
        its experts are sharded. fairseq's checkpoint loading (generate, interactive, validate,
        the hub interface) passes from_checkpoint=True: whole experts, which load any
        checkpoint in any process group (sharding.expert_parallel_build)."""
        check_pruned_serves(args, self.args.source_lang, self.args.target_lang)
        with expert_parallel_build(enabled=not from_checkpoint):
            model = super().build_model(args, from_checkpoint)
        if "src_lang_idx" not in inspect.signature(model.forward).parameters:
            raise ValueError(
                f"--task {TASK_NAME} gives every batch per-row language ids, which model "
                f"{type(model).__name__} does not take. Use --arch task_moe* (--moe-freq 0 for a "
                "dense baseline), or --task translation_multi_simple_epoch for this model."
            )
        return model


def check_pruned_serves(model_args, source_lang, target_lang):
    """A pruned checkpoint refuses, at start-up, a pair it has no experts for."""
    layout = getattr(model_args, "moe_pruned_layout", None)
    if not layout or source_lang is None or target_lang is None:
        return
    served = json.loads(layout)["served_pairs"]
    pair = f"{source_lang}-{target_lang}"
    if not serves(served, source_lang, target_lang):
        raise ValueError(
            f"this pruned checkpoint serves only {', '.join(served)}; it cannot translate {pair}. "
            "Use the full checkpoint, or prune for that pair with taskmoe-prune --lang-pair "
            f"{pair}."
        )
