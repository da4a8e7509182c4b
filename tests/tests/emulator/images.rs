//! AMIs through the Rust SDK: what `amictl recall --disable-image` sends when the policy says
//! `recalled_image = "deprecate"`, and how the SDK reads the answer.

use crate::fixture::emulator;

/// `EnableImageDeprecation` with a `DeprecateAt` the SDK serialises, read back by DescribeImages
/// as the `DeprecationTime` string the SDK deserialises (what `retire_image` compares).
#[tokio::test]
async fn an_image_deprecation_is_sent_and_read_back_through_the_sdk() {
    let (_local, c) = emulator().await;
    let ami = c.register("golden-deprecated").await;
    let at = (chrono::Utc::now() + chrono::Duration::minutes(3)).timestamp() / 60 * 60;
    let done = c
        .ec2
        .enable_image_deprecation()
        .image_id(&ami)
        .deprecate_at(aws_sdk_ec2::primitives::DateTime::from_secs(at))
        .send()
        .await
        .unwrap();
    assert_eq!(done.r#return(), Some(true));
    let image = c
        .ec2
        .describe_images()
        .image_ids(&ami)
        .send()
        .await
        .unwrap()
        .images()[0]
        .clone();
    let shown = chrono::DateTime::parse_from_rfc3339(image.deprecation_time().unwrap()).unwrap();
    assert_eq!(shown.timestamp(), at, "{image:?}");
}
