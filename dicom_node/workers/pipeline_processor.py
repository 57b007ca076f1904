"""The default processor: the synthmrf pipeline with a model package from the registry.

Configured by ``[pipeline]`` (model, models_dir, device, precision, derived_series, pd_map,
allow_out_of_range, uid_root). torch and the pipeline are imported on the first job, not when the node starts.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dicom_node.config import PipelineSection
from dicom_node.workers.processor import ProcessResult

logger = logging.getLogger(__name__)


class PipelineProcessor:
    """``(input_dir, out_dir, *, model) -> ProcessResult`` through ``pipeline.process.process_series``."""

    def __init__(self, cfg: PipelineSection) -> None:
        self.cfg = cfg

    def __call__(self, input_dir: Path, out_dir: Path, *, model: str | None = None) -> ProcessResult:
        from pipeline.model.registry import load_model
        from pipeline.process import ProcessOptions, process_series

        package = load_model(model, self.cfg.models_dir)  # None: the active model, looked up for every job
        options = ProcessOptions(device=self.cfg.device, precision=self.cfg.precision, backend=self.cfg.backend,
                                 derived_series=self.cfg.derived_series, pd_dicom=self.cfg.pd_map,
                                 allow_out_of_range=self.cfg.allow_out_of_range, uid_root=self.cfg.uid_root,
                                 contrasts=tuple(c.contrast() for c in self.cfg.synthetic_contrasts),
                                 regions=self.cfg.regions, summary=self.cfg.summary)
        return process_series(input_dir, out_dir, package, options=options)
