"""Executors: how the engine's steps reach the workers."""

from shardline.executor.base import (EngineDeadError, Executor, StepFuture, create_executor,
                                     executor_class)

__all__ = ["EngineDeadError", "Executor", "StepFuture", "create_executor", "executor_class"]
