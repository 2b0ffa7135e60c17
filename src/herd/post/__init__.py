"""Post-training: evaluation on verifiable tasks (herd.post.evaluate), what the SFT, RL and DPO stages stand on."""
