"""Training: the state and optimizer (`training_state`), the steps, their
placement and compiled programs (`steps`, `programs`), the loop
(`train_lib`), divergence handling, results, and fine-tuning's start."""
