"""Fixtures shared by the test files: one CPU thread for the whole session (tiny matmuls on a shared 2-core machine
run far slower with two threads than with one), the built-in tiny tokenizer and model, and a fake episode."""
import pytest
import torch

import model as model_lib


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tok():
    return model_lib.build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of model.load("tiny"): random init, built in."""
    return model_lib.load("tiny", device="cpu")


class OneTurn:
    """A one-turn episode of the episode protocol: a fixed two-message chat, done after the first reply."""

    def __init__(self, task_id="t"):
        self.task_id, self.trajectory, self.done = task_id, [], False

    def initial_messages(self):
        return [{"role": "system", "content": "You play Sokoban."}, {"role": "user", "content": "# _ X O P #"}]

    def step(self, reply):
        self.trajectory.append({"reply": reply, "observation": "", "valid": True, "error": None})
        self.done = True
        return "", True

    def abort(self, reason):
        self.done = True
