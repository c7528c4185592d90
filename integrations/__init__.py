"""Adapters from training frameworks to the mfumon engine.

`mfumon.integrations.lightning.MFUCallback` for Lightning and
`mfumon.integrations.transformers.MFUCallback` for the HF Trainer. Each imports its framework
only when used; importing `mfumon` never imports this package's frameworks.
"""
