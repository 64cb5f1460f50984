"""The names of the files reap writes beside a pruned checkpoint, defined once.

Light on purpose (no imports): the pruner, the report, the CLI and the demo all read these names, and importing
this module never pulls in the heavier modules that write the files.
"""

REPORT_NAME = "reap_report.json"  # the record of a pruning (options, calibration, kept/pruned experts per layer)
STATS_NAME = "reap_stats.safetensors"  # the calibration statistics (``reap calibrate``'s output format)
CARD_NAME = "README.md"  # the model card (replaces the source's own card in the pruned copy)
SUMMARY_NAME = "reap_summary.txt"  # the text summary of a pruning (``reap report``)
FIGURES = {  # the pictures of ``reap report``, by kind
    "heatmap": "reap_saliency_heatmap.png",
    "curves": "reap_saliency_curves.png",
    "scatter": "reap_frequency_vs_reap.png",
}
#: the report's files beside a pruned checkpoint (never copied from a source that was pruned before)
GENERATED = (*FIGURES.values(), SUMMARY_NAME)
