"""BLIP for visual question answering (VQA v2), answers generated or ranked by the decoder.

The question is encoded with [ENC] as first token, cross-attending to the image; the answer
decoder cross-attends to the question states. Training: LM loss of every ground-truth answer,
weighted by its answer weight. Inference, as the original:
- 'rank': the k_test candidates from the answer list most likely by their first token, then
  the candidate with the best full-sequence (label-smoothed) LM score;
- 'generate': beam search (3 beams, max_length 10, min_length 1).
"""
import torch
import torch.nn.functional as F
from torch import nn

from models.blip import create_vit, init_tokenizer, load_med_config, load_pretrained
from models.med import BertLMHeadModel, BertModel, smoothed_sequence_loss


class BLIP_VQA(nn.Module):
    def __init__(
        self,
        med_config='configs/med_config.json',
        image_size=480,
        vit='base',
        vit_grad_ckpt=False,
        vit_ckpt_layer=0,
    ):
        """
        Args:
            med_config: path of the MED (text model) JSON config.
            image_size: input image size.
            vit: 'base', 'large' or a mapping {width, depth, heads, patch_size}.
        """
        super().__init__()
        self.visual_encoder, vision_width = create_vit(vit, image_size, vit_grad_ckpt, vit_ckpt_layer,
                                                       drop_path_rate=0.1)
        self.tokenizer = init_tokenizer()

        encoder_config = load_med_config(med_config, vision_width)
        self.text_encoder = BertModel(config=encoder_config, add_pooling_layer=False)

        # The decoder cross-attends to the question states, not to the image: its key/value
        # width is the text width. (The original keeps the JSON's encoder_width, which equals
        # the text width in every official config; any other value could not run.)
        decoder_config = load_med_config(med_config, encoder_config.hidden_size)
        self.text_decoder = BertLMHeadModel(config=decoder_config)

    def forward(self, image, question, answer=None, n=None, weights=None, train=True,
                inference='rank', k_test=128, image_embeds=None):
        """
        train=True: `answer` is the flat list of answers of all questions, `n[b]` how many
        belong to question b, `weights` their weights; returns the weighted LM loss.
        train=False: inference='generate' returns answer strings; inference='rank' returns the
        index (into the candidates) of each question's best answer, with `answer` the
        candidate list: its tokenization with [DEC] first (as train_vqa builds it), or strings.
        image_embeds: the visual encoder's output for `image`, when the caller has it already
        (image is then not read).
        """
        if image_embeds is None:
            image_embeds = self.visual_encoder(image)
        device = image_embeds.device
        image_atts = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=device)

        question = self.tokenizer(question, padding='longest', truncation=True, max_length=35,
                                  return_tensors='pt').to(device)
        question.input_ids[:, 0] = self.tokenizer.enc_token_id
        question_output = self.text_encoder(question.input_ids,
                                            attention_mask=question.attention_mask,
                                            encoder_hidden_states=image_embeds,
                                            encoder_attention_mask=image_atts,
                                            return_dict=True)
        question_states = question_output.last_hidden_state

        if train:
            answer = self.tokenizer(answer, padding='longest', return_tensors='pt').to(device)
            answer.input_ids[:, 0] = self.tokenizer.bos_token_id
            answer_targets = answer.input_ids.masked_fill(answer.input_ids == self.tokenizer.pad_token_id, -100)

            # Each question's states, repeated once per answer of that question.
            counts = torch.as_tensor(n, device=device)
            answer_logits = self.text_decoder(answer.input_ids,
                                              attention_mask=answer.attention_mask,
                                              encoder_hidden_states=question_states.repeat_interleave(counts, dim=0),
                                              encoder_attention_mask=question.attention_mask.repeat_interleave(counts, dim=0),
                                              return_dict=True).logits
            answer_loss = smoothed_sequence_loss(answer_logits, answer_targets)
            loss = torch.as_tensor(weights, device=device) * answer_loss
            return loss.sum() / image_embeds.size(0)

        if inference == 'generate':
            return self.generate_answers(question_states)
        if inference == 'rank':
            if isinstance(answer, (list, tuple)):
                answer = self.tokenize_candidates(answer).to(device)
            return self.rank_answer(question_states, question.attention_mask,
                                    answer.input_ids, answer.attention_mask, k_test)
        raise ValueError(f"inference must be 'rank' or 'generate', got {inference!r}")

    def tokenize_candidates(self, answer_list):
        """The answer list tokenized as train_vqa.evaluation does: longest padding, [DEC] first."""
        candidates = self.tokenizer(answer_list, padding='longest', return_tensors='pt')
        candidates.input_ids[:, 0] = self.tokenizer.bos_token_id
        return candidates

    def generate_answers(self, question_states, num_beams=3, max_length=10, min_length=1):
        # As the original: every question token is attended, padding included (all-ones mask).
        question_atts = torch.ones(question_states.shape[:-1], dtype=torch.long, device=question_states.device)
        bos_ids = torch.full((question_states.size(0), 1), self.tokenizer.bos_token_id,
                             dtype=torch.long, device=question_states.device)
        # one row per question: its beams share the question's keys/values
        outputs = self.text_decoder.generate(input_ids=bos_ids,
                                             max_length=max_length,
                                             min_length=min_length,
                                             num_beams=num_beams,
                                             eos_token_id=self.tokenizer.sep_token_id,
                                             pad_token_id=self.tokenizer.pad_token_id,
                                             encoder_hidden_states=question_states,
                                             encoder_attention_mask=question_atts)
        return [self.tokenizer.decode(output, skip_special_tokens=True) for output in outputs]

    def rank_answer(self, question_states, question_atts, answer_ids, answer_atts, k):
        """Index of the best candidate per question: top-k by first-token probability, then
        the highest full-answer log-likelihood (minus the smoothed LM loss, as the original)."""
        num_ques = question_states.size(0)
        k = min(k, answer_ids.size(0))
        # The decoder's keys/values of each question, projected once and shared by its first-
        # token step and its k candidates (rather than projecting k copies of the states).
        cross_kv = self.text_decoder.bert.compute_cross_kv(question_states)

        start_ids = answer_ids[0, 0].repeat(num_ques, 1)  # [DEC]
        start_logits = self.text_decoder(start_ids, encoder_attention_mask=question_atts, cross_kv=cross_kv,
                                         return_dict=True).logits
        prob_first_token = F.softmax(start_logits[:, 0, :], dim=1).index_select(dim=1, index=answer_ids[:, 1])
        topk_probs, topk_ids = prob_first_token.topk(k, dim=1)

        # Candidates question-major: rows [b*k, (b+1)*k) belong to question b (cross_kv's grouping).
        input_ids = answer_ids[topk_ids.reshape(-1)]
        input_atts = answer_atts[topk_ids.reshape(-1)]
        targets_ids = input_ids.masked_fill(input_ids == self.tokenizer.pad_token_id, -100)
        logits = self.text_decoder(input_ids, attention_mask=input_atts, encoder_attention_mask=question_atts,
                                   cross_kv=cross_kv, return_dict=True).logits
        log_probs_sum = -smoothed_sequence_loss(logits, targets_ids).view(num_ques, k)
        best = log_probs_sum.argmax(dim=1)
        return topk_ids.gather(1, best[:, None]).squeeze(1)


def blip_vqa(pretrained='', **kwargs):
    return load_pretrained(BLIP_VQA(**kwargs), pretrained)
