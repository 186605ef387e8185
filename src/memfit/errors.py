class MemfitError(Exception):
    """An error the user can fix: the message says what is wrong and what would work.

    The CLI prints it as one line, without a traceback, and exits with code 2.
    """


def scalar_loss(loss_fn, model, batch):
    """`loss_fn(model, batch)`, which must be the scalar loss of a training step."""
    import torch

    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
        what = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            what = "a scalar that does not require grad (computed without the model's parameters?)"
        raise MemfitError(
            f"loss_fn returned {what}; it must return the scalar loss of a training step, like model(x).pow(2).mean()."
        )
    return loss
