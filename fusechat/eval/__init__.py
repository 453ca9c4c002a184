"""Evaluation: held-out sets, verifiable benchmarks, AlpacaEval 2 / Arena-Hard answer files
(`fusechat.eval.stage.run_eval`)."""
