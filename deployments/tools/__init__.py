"""What the CLI ships for users beside the server: `q3serve bench` (`bench/`, a load generator in
the shape of `vllm bench serve`), `q3serve eval` (`evaluate.py`, `evaluate_tools.py`) with the task
set it asks (`tasks.py`, `tool_use.py`; the default model was trained on the same generators by
`training/`, which stays in the repository), and the machine description both record."""
