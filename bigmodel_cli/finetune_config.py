"""The recipe of a finetuning run (`bigmodel finetune`): the pretraining sections plus [finetune], [task], [lora]
and [preference].

It sits below the stages, so that whatever opens a finetuning run (modelio) reads its config without importing
the finetune stage.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from bigmodel_cli import tasks
from bigmodel_cli.config import (
    CheckpointConfig,
    DataConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
    _path_field,
)
from bigmodel_cli.errors import UserError
from bigmodel_cli.model.lora import LoraConfig
from bigmodel_cli.tasks.options import TaskOptions
from bigmodel_cli.train.preference import PreferenceConfig


@dataclass(frozen=True)
class FinetuneSection:
    task: str = ""  # qa, classify, summarize, translate, instruct or preference
    init_from: str = _path_field(doc="starting model")  # run dir, checkpoint, export, hf:DIR or hf:ORG/NAME[@REV]
    train_file: str = _path_field(doc="task data")  # task data to train on (format per task)
    train_file2: str = _path_field(doc="translate")  # translate: target-language file, line-aligned with train_file
    val_file: str = _path_field(doc="held-out task data")  # held-out data; "" = a share of train_file
    val_file2: str = _path_field(doc="translate")  # translate: target-language file for val_file
    val_fraction: float = 0.1  # share of train_file's examples held out when val_file is not given

    def __post_init__(self) -> None:
        if self.task:
            tasks.get(self.task)  # an unknown name is a UserError listing the kinds
        if not 0 < self.val_fraction < 1:
            raise UserError(f"finetune.val_fraction must be in (0, 1), got {self.val_fraction}")


@dataclass(frozen=True)
class FinetuneConfig:
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    task: TaskOptions = field(default_factory=TaskOptions)
    lora: LoraConfig = field(default_factory=LoraConfig)
    preference: PreferenceConfig = field(default_factory=PreferenceConfig)  # --task preference only
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.optim.name == "muon" and self.lora.rank:
            # Muon orthogonalizes full weight matrices; LoRA trains only the adapters, which take AdamW.
            raise UserError(
                "optim.name = muon trains full matrices, not LoRA adapters: set lora.rank=0 or optim.name=adamw"
            )
        if self.finetune.task and self.finetune.task != "preference" and self.preference != PreferenceConfig():
            raise UserError(
                f"[preference] applies to --task preference, not {self.finetune.task}: remove the preference.* settings"
            )
