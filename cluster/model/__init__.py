"""The tensors of one Qwen3(-MoE) forward on any device: layers, attention, experts, the model,
sampling, weight loading and the model runner. Imports neither the engine nor parallel."""
