#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| llmesh::fuzzing::api_key_record(data));
