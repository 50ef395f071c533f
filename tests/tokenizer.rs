//! The tokenizer against ids from the Hugging Face tokenizer, the chat template against
//! transformers' apply_chat_template (fixtures made by scripts/make_tokenizer_fixtures.py), and
//! streaming detokenization of multi-byte text.

mod common;

use braidinfer::tokenizer::{ChatMessage, StreamDecoder, Tokenizer};

fn tokenizer() -> Tokenizer {
    Tokenizer::from_dir(&common::tokenizer_dir()).unwrap()
}

fn fixture_json(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(common::fixture(name)).unwrap()).unwrap()
}

#[test]
fn ids_match_the_hugging_face_tokenizer() {
    let tok = tokenizer();
    let cases = fixture_json("tokenizer_ids.json");
    for case in cases.as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(tok.encode(text).unwrap(), expected, "ids of {text:?}");
        assert_eq!(
            tok.decode(&expected).unwrap(),
            text.replace("<|im_start|>", "").replace("<|im_end|>", "")
        );
    }
}

#[test]
fn chat_template_matches_transformers() {
    let tok = tokenizer();
    let cases = fixture_json("chat_template.json");
    for case in cases.as_array().unwrap() {
        let messages: Vec<ChatMessage> = case["messages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| ChatMessage::new(m["role"].as_str().unwrap(), m["content"].as_str().unwrap()))
            .collect();
        let thinking = case["enable_thinking"].as_bool();
        let rendered = tok.apply_chat_template(&messages, thinking).unwrap();
        assert_eq!(
            rendered,
            case["rendered"].as_str().unwrap(),
            "conversation {messages:?}"
        );
    }
}

fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
    let mut decoder = StreamDecoder::new(tok);
    let mut pieces: Vec<String> = ids
        .iter()
        .filter_map(|&id| decoder.push(id).unwrap())
        .collect();
    pieces.push(decoder.finish().unwrap());
    pieces
}

#[test]
fn streaming_never_splits_a_character_and_matches_the_full_decode() {
    let tok = tokenizer();
    for text in [
        "齉龘靐，饕餮与魑魅魍魉。",
        "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∮ ∑ ∫ 🦀",
        "Emoji: 🎉🚀👍🏽 family 👨‍👩‍👧 done",
        "naïve café Ελληνικά 日本語",
    ] {
        let ids = tok.encode(text).unwrap();
        // Byte-level BPE splits these characters across tokens: the case the decoder exists for.
        let single_token_pieces: Vec<String> =
            ids.iter().map(|&id| tok.decode(&[id]).unwrap()).collect();
        assert!(
            single_token_pieces.iter().any(|p| p.contains('\u{FFFD}')),
            "{text:?} has no split character"
        );
        let pieces = stream(&tok, &ids);
        for piece in &pieces {
            assert!(
                !piece.contains('\u{FFFD}'),
                "piece {piece:?} of {text:?} holds a broken character"
            );
        }
        assert_eq!(pieces.concat(), tok.decode(&ids).unwrap());
        assert_eq!(pieces.concat(), text);
    }
}

#[test]
fn streaming_skips_special_tokens() {
    let tok = tokenizer();
    let mut ids = tok.encode("Hi there").unwrap();
    ids.push(151_645); // <|im_end|>
    assert_eq!(stream(&tok, &ids).concat(), "Hi there");
}

#[test]
fn malformed_tokenizer_file_is_a_clear_error() {
    let dir = common::temp_dir("bad-tokenizer");
    std::fs::write(dir.join("tokenizer.json"), "{\"model\": 3").unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(&dir).err().unwrap());
    assert!(err.contains("malformed tokenizer file"), "{err}");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let err = format!("{:#}", Tokenizer::from_dir(&dir).err().unwrap());
    assert!(err.contains("not found"), "{err}");
}
