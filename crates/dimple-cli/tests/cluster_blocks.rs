//! Block-wise decoding and the dual cache over gRPC: the public `block_length` and
//! `cache_mode` reach the worker's engine through the router, each streamed step names its
//! block, the history equals the same request decoded by an in-process engine, and bad
//! values are refused with `INVALID_ARGUMENT` naming the field.

mod cluster_support;

use cluster_support::*;
use dimple_core::params::{CacheMode, DecodeParams};
use dimple_engine::{EngineConfig, EngineEvent, GenerateRequest};
use dimple_proto::v1;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_length_and_cache_mode_through_the_cluster() {
    let (router, _workers) = cluster(1, engine_config()).await;
    let mut client = router.client().await;
    let case = golden_case("gen_text_n24_thr0p9_cache0");
    let mut req = case.request.clone();
    {
        let p = req.params.as_mut().unwrap();
        p.block_length = Some(8);
        p.cache_mode = "dual".into();
    }
    let streamed = stream_all(&mut client, req.clone()).await.unwrap();
    let blocks: Vec<u32> = streamed.updates.iter().map(|u| u.block).collect();
    assert!(blocks.windows(2).all(|w| w[0] <= w[1]), "{blocks:?}");
    assert_eq!(blocks.first(), Some(&0));
    assert_eq!(blocks.last(), Some(&2));
    for u in &streamed.updates {
        for c in &u.committed {
            assert_eq!(
                c.position / 8,
                u.block,
                "slot {} in block {}",
                c.position,
                u.block
            );
        }
    }

    // The same request in an in-process engine over the same model.
    let Some(v1::generate_request::Input::TokenIds(ids)) = &req.input else {
        panic!("the golden request carries token ids");
    };
    let engine = dimple_engine::start(
        dimple_model::DimpleModel::load(
            &golden(""),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
        EngineConfig::default(),
        None,
    );
    let params = DecodeParams {
        max_new_tokens: 24,
        steps: 24,
        threshold: Some(0.9),
        block_length: Some(8),
        cache: Some(CacheMode::Dual),
        ..DecodeParams::default()
    };
    let mut rx = engine
        .submit(GenerateRequest {
            prompt_ids: ids.ids.clone(),
            images: Vec::new(),
            params,
            deadline: None,
        })
        .unwrap();
    let mut row = vec![GOLDEN_MASK_ID; 24];
    let mut history = Vec::new();
    let mut local_blocks = Vec::new();
    loop {
        match rx.recv().await.expect("final event") {
            EngineEvent::Step {
                block, committed, ..
            } => {
                for (p, t) in committed {
                    row[p] = t;
                }
                history.push(row.clone());
                local_blocks.push(block as u32);
            }
            EngineEvent::Finished(_) => break,
            EngineEvent::Failed(e) => panic!("{e}"),
        }
    }
    engine.shutdown();
    assert_eq!(streamed.history, history);
    assert_eq!(blocks, local_blocks);

    for (field, edit) in [
        (
            "cache_mode",
            (|p: &mut v1::DecodeParams| p.cache_mode = "full".into()) as fn(&mut _),
        ),
        ("block_length", |p: &mut v1::DecodeParams| {
            p.block_length = Some(0)
        }),
        ("block_length", |p: &mut v1::DecodeParams| {
            p.block_length = Some(25)
        }),
    ] {
        let mut bad = req.clone();
        edit(bad.params.as_mut().unwrap());
        let status = client.generate(bad).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(field), "{status:?}");
    }
}
