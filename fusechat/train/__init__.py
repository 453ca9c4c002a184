"""Training the target: SFT then DPO with TRL (`sft.py`, `dpo.py`), launched by `launch.py`."""
