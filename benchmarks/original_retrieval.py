"""The original BLIP's retrieval evaluation, written here with our modules: the baseline that
bench_retrieval_rerank.py and bench_gpu.py time ours against (one encoder call per image, then
one per text, each image's tokens copied for every candidate)."""
import torch
import torch.nn.functional as F


@torch.no_grad()
def original_features(model, images, texts, device):
    """Text ids ([ENC] first), masks and ITC features; image tokens and ITC features."""
    tokens = model.tokenizer(texts, padding='max_length', truncation=True, max_length=35,
                             return_tensors='pt').to(device)
    text_out = model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask, mode='text')
    text_embeds = F.normalize(model.text_proj(text_out.last_hidden_state[:, 0, :]), dim=-1)
    text_ids = tokens.input_ids.clone()
    text_ids[:, 0] = model.tokenizer.enc_token_id
    image_feats = model.visual_encoder(images.to(device))
    image_embeds = F.normalize(model.vision_proj(image_feats[:, 0, :]), dim=-1)
    return text_ids, tokens.attention_mask, text_embeds, image_feats.cpu(), image_embeds


@torch.no_grad()
def original_rerank(model, sims_matrix, image_feats, text_ids, text_atts, k_test, device):
    """The original's loops: one encoder call per image, then one per text."""
    num_images, num_texts = sims_matrix.shape

    def itm_logit(ids, atts, image_tokens):
        image_mask = torch.ones(image_tokens.shape[:-1], dtype=torch.long, device=device)
        out = model.text_encoder(ids, attention_mask=atts, encoder_hidden_states=image_tokens,
                                 encoder_attention_mask=image_mask, return_dict=True)
        return model.itm_head(out.last_hidden_state[:, 0, :])[:, 1].float()  # float32 under autocast too

    i2t = torch.full((num_images, num_texts), -100.0, device=device)
    for i in range(num_images):
        top_sim, top_idx = sims_matrix[i].topk(k=k_test, dim=0)
        image_tokens = image_feats[i].repeat(k_test, 1, 1).to(device)  # one copy per text
        i2t[i, top_idx] = itm_logit(text_ids[top_idx], text_atts[top_idx], image_tokens) + top_sim

    t2i = torch.full((num_texts, num_images), -100.0, device=device)
    sims_t = sims_matrix.t()
    for t in range(num_texts):
        top_sim, top_idx = sims_t[t].topk(k=k_test, dim=0)
        image_tokens = image_feats[top_idx].to(device)
        t2i[t, top_idx] = itm_logit(text_ids[t].repeat(k_test, 1), text_atts[t].repeat(k_test, 1),
                                    image_tokens) + top_sim
    return i2t, t2i


@torch.no_grad()
def original_evaluation(model, images, texts, k_test, device):
    model.eval()
    text_ids, text_atts, text_embeds, image_feats, image_embeds = original_features(model, images, texts, device)
    sims = image_embeds @ text_embeds.t()
    i2t, t2i = original_rerank(model, sims, image_feats, text_ids, text_atts, k_test, device)
    return i2t.cpu().numpy(), t2i.cpu().numpy()
