"""Online speculative decoding: train the drafter on verification traces.

traces (Redis stream) -> TraceConsumer -> TrainerWorker (distillation step,
acceptance head) -> CheckpointStore (publish, promotion gate) -> drafters.
"""
