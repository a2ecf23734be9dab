"""A site's two jobs: fit the received global adapter on its train split, and score a received adapter on one of
its held-out splits as NLL sums and token counts (sums combine across sites; perplexities do not)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from fl_crew_reddit.evaluation.evaluator import held_out_nll
from fl_crew_reddit.site.attacks import attacker_training_config
from fl_crew_reddit.site.data import SiteData
from fl_crew_reddit.site.outgoing import outgoing_update
from fl_crew_reddit.training.trainer import LocalTrainer

AdapterState = dict[str, torch.Tensor]


@dataclass
class SiteFitResult:
    state: AdapterState  # what the site sends: the whole adapter, or only the B factors under FFA-LoRA
    num_examples: int
    metrics: dict = field(default_factory=dict)


@dataclass(frozen=True)
class EvalSums:
    nll_sum: float
    num_tokens: int


def pair_rows_for(data: SiteData, fit_config: dict) -> dict:
    """LocalTrainer's `pair_rows` keyword for a fit: the site's train pairs when the objective uses them (DPO);
    nothing for SFT, so an SFT fit never reads or tokenizes a pair file."""
    if fit_config.get("objective", "sft") == "sft":
        return {}
    return {"pair_rows": data.pair_rows("train")}


def image_settings(config, projector) -> dict:
    """What a site away from the server needs to train `projector` (the server's ImageProjector; None: text only,
    {}): its spec, the CLIP model whose stored features the site reads (IMAGE_PROCESSOR) and
    MAX_IMAGES_PER_EXAMPLE; sent with the model settings, read by `site_image_parts`."""
    if projector is None:
        return {}
    return {"image_projector": projector.spec.to_json(), "image_processor": config.image_processor,
            "max_images_per_example": config.max_images_per_example}


def site_image_parts(settings: dict, model):
    """(the ImageProjector, the ImageRowSettings) of a site away from the server (a Flower site, its worker, a
    trainer process) when the server's settings describe a projector (`image_projector`: its ProjectorSpec as JSON;
    its tensors come with every received adapter), else (None, None): text only. The site's image rows use the
    features its own preprocessing stored beside its images for the CLIP model of `image_processor`."""
    spec = str(settings.get("image_projector") or "")
    if not spec:
        return None, None
    from fl_crew_reddit.preprocessing.image_features import resolve_clip_source
    from fl_crew_reddit.site.data import ImageRowSettings
    from fl_crew_reddit.training.multimodal import ImageProjector, ProjectorSpec, stored_features

    projector_spec = ProjectorSpec.from_json(spec, where="the server's image_projector setting")
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if projector_spec.hidden_size != int(causal_lm.config.hidden_size):
        raise ValueError(f"the server's image projector writes {projector_spec.hidden_size}-wide soft tokens; this "
                         f"site's model is {causal_lm.config.hidden_size} wide (not the server's BASE_LLM_MODEL?)")
    projector = ImageProjector(projector_spec).to(causal_lm.get_input_embeddings().weight.device)
    source = resolve_clip_source(str(settings.get("image_processor") or ""))
    images = ImageRowSettings(stored_features(source), projector_spec.tokens,
                              int(settings.get("max_images_per_example") or 1))
    return projector, images


class Site:
    """One client. `model` is a PEFT model (in-process: the one model every site shares)."""

    def __init__(self, name: str, data: SiteData, model, tokenizer, device: torch.device,
                 mixed_precision: str = "auto", show_progress: bool = True, projector=None):
        self.name = name
        self.data = data
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.mixed_precision = mixed_precision
        self.show_progress = show_progress
        self.projector = projector  # multimodal: the ImageProjector trained with the adapter (None: text only)

    @classmethod
    def from_folder(cls, name: str, folder: Path, model, tokenizer, device: torch.device, *, max_seq_length: int,
                    mixed_precision: str = "auto", show_progress: bool = True, settings: dict | None = None) -> Site:
        """A site on its own data folder; `settings` (the server's model settings): with `image_projector` the site
        trains the image projector the server described, on its own stored CLIP features (`site_image_parts`)."""
        projector, images = site_image_parts(settings or {}, model)
        return cls(name, SiteData(folder, tokenizer, max_seq_length, images=images), model, tokenizer, device,
                   mixed_precision=mixed_precision, show_progress=show_progress, projector=projector)

    def fit(self, global_adapter: AdapterState, fit_config: dict,
            error_feedback: dict[str, torch.Tensor] | None = None) -> SiteFitResult:
        """Local training from the global adapter (LocalTrainer), as the fit config says, on the site's train rows
        (poisoned first when the fit config makes it a simulated data attacker), then what the site does to the
        update before it leaves (`outgoing_update`)."""
        trainer = LocalTrainer(self.name, self.model, self.tokenizer,
                               self.data.train_rows(self.name, fit_config), self.device,
                               mixed_precision=self.mixed_precision, show_progress=self.show_progress,
                               projector=self.projector, **pair_rows_for(self.data, fit_config))
        result = trainer.fit(global_adapter, attacker_training_config(self.name, fit_config))  # ATTACK_LOCAL_EPOCHS
        train = "train"
        if self.projector is not None and train in self.data.images_used:  # what conditioned, what was left out
            result.metrics["images_used"] = self.data.images_used[train]
            result.metrics["image_rows"] = sum(1 for row in trainer.train_rows if row.get("image_slots"))
            result.metrics.update({f"images_left_out_{reason}": count
                                   for reason, count in sorted(self.data.images_left_out[train].items())})
        # UPDATE_COMPRESSION topk / sign: the residual the caller keeps (in-process: the workspace's), or else, on a
        # site with its own folder (Flower), the one kept there (site/feedback.py)
        in_folder = error_feedback is None and self.data.folder is not None and \
            fit_config.get("update_compression") in ("topk", "sign")  # the error-feedback kinds
        if in_folder:
            from fl_crew_reddit.site.feedback import load_site_feedback

            error_feedback = load_site_feedback(self.data.folder, int(fit_config.get("round", 0)))
        state, sent_metrics = outgoing_update(self.name, global_adapter, result.state, fit_config,
                                              error_feedback=error_feedback)
        if in_folder:
            from fl_crew_reddit.site.feedback import save_site_feedback

            save_site_feedback(self.data.folder, int(fit_config.get("round", 0)), error_feedback)
        return SiteFitResult(state=state, num_examples=result.num_examples,
                             metrics={**result.metrics, **sent_metrics})

    def evaluate(self, global_adapter: AdapterState | None, splits: tuple[str, ...] = ("test",)) -> dict[str, EvalSums]:
        """Summed reply-token NLL and token count of each split, with `global_adapter` loaded (None: the model as it
        is). The same computation, batch by batch, as the in-process evaluator's, so combined sums are equal."""
        if global_adapter is not None:
            from peft import set_peft_model_state_dict

            from fl_crew_reddit.training.multimodal import load_projector_state, split_projector

            adapter, projector = split_projector(global_adapter)  # multimodal: the projector travels with it
            set_peft_model_state_dict(self.model, adapter)
            if projector and self.projector is not None:
                load_projector_state(self.projector, projector, where=f"the adapter {self.name} evaluates")
        sums = {}
        for split in splits:
            rows = self.data.rows(split)
            total, count = (held_out_nll(self.model, rows, self.tokenizer.pad_token_id, self.device,
                                         mixed_precision=self.mixed_precision, projector=self.projector)
                            if rows else (0.0, 0))  # multimodal: image rows with their images
            sums[split] = EvalSums(nll_sum=float(total), num_tokens=int(count))
        return sums

    def evaluate_preferences(self, splits: tuple[str, ...], beta: float) -> dict[str, dict]:
        """`training.dpo.preference_metrics` of the adapter the model holds now (call after `evaluate`, which loads
        the received one) on each split's preference pairs; only the splits that have pairs. Counts and means only:
        they combine across sites by pair counts (`server.evaluation.combine_preferences`)."""
        scores = {}
        for split in splits:
            rows = self.data.pair_rows(split)
            if rows:
                from fl_crew_reddit.training.dpo import preference_metrics

                scores[split] = preference_metrics(self.model, rows, self.device, self.tokenizer.pad_token_id, beta)
        return scores
