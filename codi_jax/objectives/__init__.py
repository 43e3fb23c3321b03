"""The training objectives: CoDi (and the plain conditional fine-tune), the teacher's diffusion loss."""
