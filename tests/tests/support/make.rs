//! What the tests make in AWS the same way wherever they make it: shared by the e2e tests
//! (`support::make`) and the emulator tests (`tests/emulator/fixture.rs` includes this file).

/// A launch template named `name` whose version 1 runs `ami` on t3.micro; its id.
pub async fn launch_template(ec2: &aws_sdk_ec2::Client, name: &str, ami: &str) -> String {
    ec2.create_launch_template()
        .launch_template_name(name)
        .launch_template_data(
            aws_sdk_ec2::types::RequestLaunchTemplateData::builder()
                .image_id(ami)
                .instance_type(aws_sdk_ec2::types::InstanceType::T3Micro)
                .build(),
        )
        .send()
        .await
        .unwrap()
        .launch_template()
        .unwrap()
        .launch_template_id()
        .unwrap()
        .to_owned()
}

/// An AMI registered as `name` (an EBS root at /dev/xvda), tagged with `tags` if given; its id.
pub async fn image(
    ec2: &aws_sdk_ec2::Client,
    name: &str,
    tags: Option<aws_sdk_ec2::types::TagSpecification>,
) -> String {
    ec2.register_image()
        .name(name)
        .root_device_name("/dev/xvda")
        .set_tag_specifications(tags.map(|t| vec![t]))
        .send()
        .await
        .unwrap()
        .image_id()
        .unwrap()
        .to_owned()
}
