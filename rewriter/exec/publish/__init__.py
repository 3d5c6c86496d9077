"""Checking and publishing an output: every byte against its planned source
(:func:`rewriter.exec.publish.verify.verify`), ``pruning.json`` as untrusted input, the model
card and its Hub metadata.
"""

from rewriter.exec.publish.hubmeta import check_base_model
from rewriter.exec.publish.modelcard import CARD_NAME, load_eval, update_card, write_model_card
from rewriter.exec.publish.verify import VerifyReport, load_provenance_plan

__all__ = ["CARD_NAME", "VerifyReport", "check_base_model", "load_eval", "load_provenance_plan",
           "update_card", "write_model_card"]
