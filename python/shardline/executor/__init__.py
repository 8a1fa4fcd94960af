"""Executors: how the engine's steps reach the workers."""

from shardline.executor.base import Executor, create_executor, executor_class

__all__ = ["Executor", "create_executor", "executor_class"]
