"""Shared by the tutorial scripts: says why a tutorial's sketched model can hold more parameters
than the dense one, and shows schedules that save (not tutorial text)."""
import panther as pr


def explain_growth(standard_params, sketched_model, make_smaller, smaller_desc):
    """Print why ``sketched_model`` is larger than a dense model of ``standard_params`` numbers,
    and the size of ``make_smaller()`` (a model with the schedules ``smaller_desc``). Prints
    nothing when the sketched model is not larger."""
    sketched_params = sum(p.numel() for p in sketched_model.parameters())
    if sketched_params <= standard_params:
        return
    sk_layers = [m for m in sketched_model.modules() if isinstance(m, pr.nn.SKLinear)]
    grown = [m for m in sk_layers
             if m.num_terms * m.low_rank * (m.in_features + m.out_features) >= m.in_features * m.out_features]
    print("Why the reduction is negative: SKLinear(d_in, d_out, num_terms=L, low_rank=k) trains "
          "L*k*(d_in + d_out) numbers where nn.Linear trains d_in*d_out; with this tutorial's default "
          f"schedules (num_terms=8, low_rank={sk_layers[0].low_rank} on the first layer) {len(grown)} of "
          f"{len(sk_layers)} layers grow.")
    smaller_params = sum(p.numel() for p in make_smaller().parameters())
    print(f"Smaller schedules save: {smaller_desc} "
          f"give {smaller_params:,} parameters, a reduction of {(1 - smaller_params / standard_params) * 100:.1f}%")
