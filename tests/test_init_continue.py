"""train.init_continue carries SGD momentum by parameter name, alike for every method."""

import torch
from torch import nn

from ssod.resume import carry_momentum
from ssod.run_state import optimizer_parameter_names


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)


class WithPolisher(nn.Module):
    """A burn-in's model: the detector and a polishing network (a Polishing Teacher burn-in)."""

    def __init__(self) -> None:
        super().__init__()
        self.detector = Detector()
        self.polisher = nn.Linear(2, 2)


class DetectorOnly(nn.Module):
    """A supervised or Soft Teacher arm's model: the same detector, no polishing network."""

    def __init__(self) -> None:
        super().__init__()
        self.detector = Detector()


def trained_state(model: nn.Module) -> tuple[dict, list[str]]:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        optimizer.zero_grad()
        out = model.detector.head(model.detector.backbone(torch.randn(5, 3)))
        (model.polisher(out).sum() + out.pow(2).sum()).backward()
        optimizer.step()
    return optimizer.state_dict(), optimizer_parameter_names(model, optimizer)


def test_every_arm_continues_the_burn_ins_detector_momentum_by_name():
    torch.manual_seed(0)
    saved, saved_names = trained_state(WithPolisher())
    assert saved_names[0] == "detector.backbone.weight" and saved_names[-1] == "polisher.bias"
    buffers = dict(zip(saved_names, (saved["state"][i]["momentum_buffer"] for i in range(len(saved_names)))))

    arms = {"polish": WithPolisher(), "supervised": DetectorOnly()}
    for model in arms.values():
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        names = optimizer_parameter_names(model, optimizer)
        carried = carry_momentum(saved, saved_names, optimizer, names)
        assert carried == len(names)  # every parameter of either arm exists in the burn-in
        for name, param in model.named_parameters():
            assert torch.equal(optimizer.state[param]["momentum_buffer"], buffers[name]), name
    assert len(list(arms["supervised"].parameters())) < len(saved_names)


def test_a_parameter_the_checkpoint_lacks_or_shapes_differently_starts_at_zero_momentum():
    torch.manual_seed(0)
    saved, saved_names = trained_state(WithPolisher())
    model = WithPolisher()
    model.polisher = nn.Linear(2, 3)  # another shape: no buffer to carry
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    carried = carry_momentum(saved, saved_names, optimizer, optimizer_parameter_names(model, optimizer))
    assert carried == 4
    assert "momentum_buffer" not in optimizer.state[model.polisher.weight]
