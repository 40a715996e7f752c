import torch
from transformers import SiglipConfig, SiglipModel

from keye.train.losses import siglip_sigmoid_loss


def test_siglip_loss_equals_transformers_siglip():
    torch.manual_seed(0)
    config = SiglipConfig(
        text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, projection_size=32),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
    )
    model = SiglipModel(config).eval()
    with torch.no_grad():
        model.logit_scale.fill_(1.7)
        model.logit_bias.fill_(-3.0)
        ids = torch.randint(0, 50, (5, 6))
        out = model(input_ids=ids, pixel_values=torch.randn(5, 3, 28, 28), return_loss=True)
    ours = siglip_sigmoid_loss(out.image_embeds, out.text_embeds, model.logit_scale, model.logit_bias)
    torch.testing.assert_close(ours, out.loss)


def test_siglip_loss_prefers_matched_pairs():
    torch.manual_seed(0)
    emb = torch.randn(8, 16)
    scale, bias = torch.tensor(2.3), torch.tensor(-5.0)
    matched = siglip_sigmoid_loss(emb, emb + 0.01 * torch.randn(8, 16), scale, bias)
    shuffled = siglip_sigmoid_loss(emb, emb[torch.randperm(8)], scale, bias)
    assert matched < shuffled


def test_region_loss_equals_a_pairwise_reference_and_is_siglip_on_one_patch_per_phrase():
    from keye.train.losses import region_sigmoid_loss

    torch.manual_seed(0)
    patches, phrases = torch.randn(7, 16), torch.randn(3, 16)
    target = torch.tensor([0, -1, 2, 2, 1, -1, 0])
    scale, bias = torch.tensor(1.2), torch.tensor(-2.0)
    ours = region_sigmoid_loss(patches, phrases, target, scale, bias)
    p, q = torch.nn.functional.normalize(patches, dim=-1), torch.nn.functional.normalize(phrases, dim=-1)
    reference = 0.0
    for i in range(7):
        for k in range(3):
            z = float(p[i] @ q[k]) * scale.exp() + bias
            reference += -torch.nn.functional.logsigmoid(z if target[i] == k else -z)
    torch.testing.assert_close(ours, reference / 7)
    image, text = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(region_sigmoid_loss(image, text, torch.arange(5), scale, bias),
                               siglip_sigmoid_loss(image, text, scale, bias))
