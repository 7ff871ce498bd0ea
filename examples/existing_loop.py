"""Adding the DINO loss to a training loop you already have: one line in the loop.

Your loop already makes a student and a teacher output for the views; `criterion(...)` is the
only DINO line. (The teacher here is kept by the library's EMATeacher, but any EMA works.)
"""
import torch
from torch import nn

from dino_pytorch import DINOHead, DINOLoss, EMATeacher, MultiCropWrapper

torch.manual_seed(0)
backbone = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
student = MultiCropWrapper(backbone, DINOHead(32, 1024, hidden_dim=256, bottleneck_dim=64))
teacher = EMATeacher(student, momentum=0.99)
optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
criterion = DINOLoss(1024)

for step in range(5):
    views = [torch.randn(8, 3, 32, 32) for _ in range(2)] + [torch.randn(8, 3, 16, 16) for _ in range(4)]
    student_out, teacher_out = student(views), teacher(views[:2])
    loss = criterion(student_out, teacher_out)  # <- the one DINO line
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    teacher.update()
    print(f"step {step}: loss {loss.item():.4f}")
